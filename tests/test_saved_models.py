"""Models saved by hf_flop 0.1 keep loading, with the same logits, whatever the plan format becomes.

The folders under ``tests/fixtures/saved_v0_1/`` were compacted and saved by hf_flop 0.1.0
(``tests/fixtures/make_saved_models.py`` says how and from which commit). Their ``config.flop_plan``
is in the released format: the per-transformer-layer summary is under ``"blocks"`` and a
``block_sparse`` module entry counts its blocks under ``"blocks"``. Each folder also carries its own
copy of the remote code, as a model on the Hub does. Here every folder must

* still be in that old format (so these tests keep testing it after the code moves on),
* load through the Auto classes that ``import hf_flop`` registers (the current code reading the old
  plan) and give the stored logits,
* load with ``trust_remote_code=True`` from its own old code, without hf_flop, and give them too,
* take a second FLOP step (row pruning) and compaction on top, which merges the old plan into the new.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from hf_flop import FlopConfig, compact, get_flop_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "saved_v0_1"
# the module kinds each fixture was made to contain (make_saved_models.py)
EXPECTED_KINDS = {
    "bert_rank_head_row": {"low_rank", "linear"},
    "gpt2_head_row": {"conv1d"},
    "bert_two_step_block": {"block_sparse"},
    "llama_gqa_tied_embedding": {"factorized_embedding", "linear", "tied_embedding_head"},
}
NAMES = sorted(EXPECTED_KINDS)
# the keys of one entry of the old per-layer summary plan["blocks"]
OLD_LAYER_KEYS = {"heads", "kv_heads", "intermediate", "heads_before", "kv_heads_before", "intermediate_before"}
CODE_FILES = ("configuration_flop.py", "modeling_flop.py", "block_sparse.py", "factorized_embedding.py")
ATOL = 1e-5  # the stored logits are of order 1 (make_saved_models.INIT), so this is tight


def raw_config(name: str) -> dict:
    """The fixture's ``config.json`` as written in 0.1, not as any config class reads it."""
    return json.loads((FIXTURES / name / "config.json").read_text())


def auto_class(config: dict) -> type:
    """The transformers Auto class that ``auto_map`` gives for the saved architecture."""
    architecture = config["architectures"][0]
    names = [auto for auto, target in config["auto_map"].items() if target.endswith("." + architecture)]
    assert names, (architecture, config["auto_map"])
    # several may name it (GPT-2's LM head class is also its pre-training class); all build that class
    return getattr(transformers, min(names))


def stored(name: str) -> dict[str, torch.Tensor]:
    """The fixed inputs and the logits the compacted model gave for them when it was saved."""
    return load_file(str(FIXTURES / name / "inputs_and_logits.safetensors"))


def run(model: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eval-mode logits of ``model`` for the stored inputs."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits


def planned_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    """Tensor shapes (by state-dict name inside the module) that a 0.1 plan entry stands for."""
    kind, bias = spec["kind"], spec.get("bias", False)
    if kind == "linear":
        shapes = {"weight": (spec["out"], spec["in"])}
    elif kind == "conv1d":  # GPT-2's Conv1D stores its weight transposed
        shapes = {"weight": (spec["in"], spec["out"])}
    elif kind == "low_rank":
        shapes = {"in_proj.weight": (spec["rank"], spec["in"]), "out_proj.weight": (spec["out"], spec["rank"])}
        return {**shapes, **({"out_proj.bias": (spec["out"],)} if bias else {})}
    elif kind == "block_sparse":
        n, size = spec["blocks"], spec["block_size"]
        shapes = {"values": (n, size, size), "block_rows": (n,), "block_cols": (n,)}
    elif kind == "factorized_embedding":
        shapes = {"position": (sum(c["size"] for c in spec["clusters"]),)}
        for i, cluster in enumerate(spec["clusters"]):
            rank = cluster["rank"]
            shapes[f"clusters.{i}.rows"] = (cluster["size"], rank if rank is not None else spec["hidden"])
            if rank is not None:
                shapes[f"clusters.{i}.proj"] = (rank, spec["hidden"])
        return shapes
    elif kind == "tied_embedding_head":  # no weight of its own: it computes with the embedding's clusters
        return {"bias": (spec["vocab"],)} if bias else {}
    else:
        raise AssertionError(f"unknown plan kind {kind!r}")
    return {**shapes, **({"bias": (spec["out"],)} if bias else {})}


def planned_module(model: nn.Module, path: str) -> nn.Module:
    """The module at a plan path: relative to the base model, or to the whole model for task heads."""
    try:
        return model.base_model.get_submodule(path)
    except AttributeError:
        return model.get_submodule(path)


def test_every_fixture_is_there_and_every_plan_kind_is_covered():
    folders = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert folders == set(EXPECTED_KINDS)
    for name in NAMES:
        files = {p.name for p in (FIXTURES / name).iterdir()}
        assert {"config.json", "model.safetensors", "inputs_and_logits.safetensors", *CODE_FILES} <= files, name
    kinds = {spec["kind"] for name in NAMES for spec in raw_config(name)["flop_plan"]["modules"].values()}
    assert kinds == {"linear", "conv1d", "low_rank", "block_sparse", "factorized_embedding", "tied_embedding_head"}


@pytest.mark.parametrize("name", NAMES)
def test_fixture_holds_the_old_plan_format(name):
    config = raw_config(name)
    plan = config["flop_plan"]
    assert config["model_type"].startswith("flop_")
    assert config["auto_map"]["AutoConfig"].startswith("configuration_flop.Flop")
    assert set(plan) == {"modules", "attributes", "blocks"}  # the 0.1 keys; no "layers" yet
    assert plan["blocks"] and all(set(entry) == OLD_LAYER_KEYS for entry in plan["blocks"].values())
    assert {spec["kind"] for spec in plan["modules"].values()} == EXPECTED_KINDS[name]
    for spec in plan["modules"].values():
        if spec["kind"] == "block_sparse":  # the count is "blocks", not "n_blocks"
            assert "n_blocks" not in spec and isinstance(spec["blocks"], int) and spec["blocks"] > 0
    if name == "bert_two_step_block":
        counts = [s["blocks"] for s in plan["modules"].values()]
        grids = [(s["out"] // s["block_size"]) * (s["in"] // s["block_size"]) for s in plan["modules"].values()]
        assert all(0 < c < g for c, g in zip(counts, grids))  # every layer lost some blocks
    # BERT and GPT-2 attention keep head counts as attributes; Llama's reads them from the weights
    assert bool(plan["attributes"]) is (not name.startswith("llama"))
    # non-uniform layers: no stock config could describe these models
    layers = list(plan["blocks"].values())
    assert len({(e["heads"], e["intermediate"]) for e in layers}) == len(layers)


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_the_classes_hf_flop_registers(name):
    config = raw_config(name)
    plan = config["flop_plan"]
    model = auto_class(config).from_pretrained(FIXTURES / name)  # no trust_remote_code: hf_flop's own classes
    assert type(model).__name__ == config["architectures"][0]
    assert type(model).__module__.split(".")[0] == "hf_flop", type(model).__module__
    assert type(model.config).__name__ == config["auto_map"]["AutoConfig"].split(".")[-1]
    for path, spec in plan["modules"].items():  # every entry of the old plan shaped its module
        shapes = {k: tuple(v.shape) for k, v in planned_module(model, path).state_dict().items()}
        assert shapes == planned_shapes(spec), path
    for path, attrs in plan["attributes"].items():
        module = planned_module(model, path)
        assert {attr: getattr(module, attr) for attr in attrs} == attrs, path
    tensors = stored(name)
    torch.testing.assert_close(run(model, tensors), tensors["logits"], atol=ATOL, rtol=0)


_REMOTE_LOADER = r"""
import json, sys
class _HideHfFlop:  # as on a machine without hf_flop: only the folder's own code can build the model
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_flop":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, _HideHfFlop())
import torch, transformers
from safetensors.torch import load_file
out = {}
for folder, auto_name in json.loads(sys.argv[1]):
    model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
    tensors = load_file(folder + "/inputs_and_logits.safetensors")
    with torch.no_grad():
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits
    out[folder] = {
        "diff": (logits - tensors["logits"]).abs().max().item(),
        "class": type(model).__name__,
        "module": type(model).__module__,
    }
out["hf_flop_imported"] = any(m.split(".")[0] == "hf_flop" for m in sys.modules)
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def remote_code_results(tmp_path_factory) -> dict:
    """Each fixture loaded with ``trust_remote_code=True`` in one fresh process that cannot import hf_flop."""
    root = tmp_path_factory.mktemp("remote_code")
    cases = [(str(FIXTURES / name), auto_class(raw_config(name)).__name__) for name in NAMES]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    # a private modules cache: the copied remote code must not land in (or come from) the user's cache
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_LOADER, json.dumps(cases)],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, result.stderr[-3000:]
    return json.loads(lines[0][len("RESULT") :])


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_its_own_remote_code(remote_code_results, name):
    assert remote_code_results["hf_flop_imported"] is False
    got = remote_code_results[str(FIXTURES / name)]
    assert got["class"] == raw_config(name)["architectures"][0]
    assert got["module"].startswith("transformers_modules."), got  # the folder's copy of modeling_flop.py
    assert got["diff"] <= ATOL, got


# BlockSparseLinear (bert_two_step_block) cannot be wrapped by FLOP in 0.1: no second step there
@pytest.mark.parametrize("name", ["bert_rank_head_row", "gpt2_head_row", "llama_gqa_tied_embedding"])
def test_row_pruning_and_compaction_on_top_of_a_loaded_model(name, tmp_path):
    config = raw_config(name)
    old = config["flop_plan"]
    model = auto_class(config).from_pretrained(FIXTURES / name).eval()
    tensors = stored(name)
    # FLOP wraps only Linear/Conv1D, so the low-rank layers stay as they are (and in the plan)
    low_rank = [path for path, spec in old["modules"].items() if spec["kind"] == "low_rank"]
    gated = get_flop_model(model, FlopConfig(levels=["row"], exclude_modules=low_rank or None)).eval()
    torch.testing.assert_close(run(gated, tensors), tensors["logits"], atol=1e-4, rtol=0)  # injection is exact
    gates = gated.base_model.gates()
    assert sorted(gates) == [f"row_{i}" for i in range(len(old["blocks"]))]
    for gate in gates.values():
        gate.close(torch.arange(0, gate.n, 4))
    expected = run(gated, tensors)
    assert (expected - tensors["logits"]).abs().max() > 1e-2  # the closed rows matter

    small = compact(gated)
    torch.testing.assert_close(run(small, tensors), expected, atol=1e-4, rtol=0)
    plan = small.config.flop_plan
    untouched = {p: s for p, s in old["modules"].items() if s["kind"] not in ("linear", "conv1d")}
    assert {p: plan["modules"][p] for p in untouched} == untouched  # carried over from the old plan
    # the per-layer summary (renamed "layers" by the restructure): heads as loaded, rows a quarter fewer
    summary = plan.get("layers", plan.get("blocks"))
    assert set(summary) == set(old["blocks"])
    for path, entry in old["blocks"].items():
        kept = entry["intermediate"] - math.ceil(entry["intermediate"] / 4)
        assert (summary[path]["heads"], summary[path]["intermediate"]) == (entry["heads"], kept), path

    small.save_pretrained(tmp_path)
    reloaded = auto_class(raw_config(name)).from_pretrained(tmp_path)
    torch.testing.assert_close(run(reloaded, tensors), expected, atol=1e-4, rtol=0)
