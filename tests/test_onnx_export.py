"""hf_flop.export_onnx: ONNX Runtime computes the compacted model's logits (issue 14, item 3).

Each model is compacted with different heads (KV groups under GQA) and FFN widths per layer, exported
once, and run by ONNX Runtime (CPU) at two batch/sequence shapes other than the traced one.
"""

from __future__ import annotations

import importlib.util
import stat

import numpy as np
import pytest
import torch
from test_compact import prune_randomly
from tiny_models import ALL_BUILDERS, TINY_BUILDERS, VOCAB, tiny_bert
from transformers import AutoModelForCausalLM, BertModel

import hf_flop
from hf_flop import FlopConfig, OnnxExportError, compact, export_onnx, get_flop_model, onnx_export, save_compacted

ort = pytest.importorskip("onnxruntime")

# (batch, length) at which ONNX Runtime is compared: neither is the traced (2, 8)
SHAPES = ((1, 11), (5, 4))


def non_uniform(arch: str, levels=("head", "row"), seed: int = 0) -> torch.nn.Module:
    """A gated tiny model whose layer 1 keeps half the head groups and layer 0 two thirds of the FFN rows."""
    model = get_flop_model(ALL_BUILDERS[arch](), FlopConfig(levels=list(levels))).eval()
    prune_randomly(model, seed)  # rank gates (and heads and rows, set next)
    gates = model.base_model.flop_structure_gates
    for layer, (heads, rows) in enumerate([(1.0, 2 / 3), (0.5, 1.0)]):
        for kind, kept in (("head", heads), ("row", rows)):
            n = gates[f"{kind}_{layer}"].n
            gates[f"{kind}_{layer}"].set_mask(torch.arange(n) < max(1, round(n * kept)))
    return model


def inputs(names: list[str], batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ids with the first row left-padded by 3 tokens (when there is more than one row)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[0, :3] = 0
    values = {
        "input_ids": torch.randint(1, VOCAB, (batch, length), generator=g),
        "attention_mask": mask,
        "token_type_ids": torch.randint(0, 2, (batch, length), generator=g),
    }
    return {name: values[name] for name in names}


def assert_onnx_runtime_matches(path, model, names: list[str], atol: float = 1e-4, scaled: bool = False) -> None:
    """ONNX Runtime's logits equal ``model``'s within ``atol`` (``scaled``: times the largest |logit|) at ``SHAPES``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert all(i.shape == ["batch", "sequence"] for i in session.get_inputs())  # dynamic axes, named
    for seed, (batch, length) in enumerate(SHAPES):
        feed = inputs(names, batch, length, seed)
        with torch.no_grad():
            expected = model(**feed).logits.numpy()
        (logits,) = session.run(["logits"], {k: v.numpy() for k, v in feed.items()})
        assert logits.shape == expected.shape
        if logits.ndim == 3:  # per token: padding positions attend to nothing and carry no meaning
            real = feed["attention_mask"].numpy().astype(bool)
            logits, expected = logits[real], expected[real]
        scale = max(1.0, float(np.abs(expected).max())) if scaled else 1.0
        np.testing.assert_allclose(logits, expected, atol=atol * scale, rtol=0)


@pytest.mark.parametrize("arch", sorted(TINY_BUILDERS))
def test_onnx_runtime_matches_the_compacted_model(arch, tmp_path):
    small = compact(non_uniform(arch, ("rank", "head", "row")))
    layers = small.config.flop_plan["layers"].values()
    assert len({(layer["heads"], layer["kv_heads"], layer["intermediate"]) for layer in layers}) == 2  # non-uniform
    path = export_onnx(small, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch == "bert" else [])
    assert_onnx_runtime_matches(path, small, names)
    assert small.training is False


@pytest.mark.slow  # 20-50 s each on a shared 2-core machine
@pytest.mark.parametrize("arch", sorted(set(ALL_BUILDERS) - set(TINY_BUILDERS)))  # with the recognised layouts
def test_the_other_architectures_export_too(arch, tmp_path):
    small = compact(non_uniform(arch, ("rank", "head", "row")))
    path = export_onnx(small, tmp_path / "model.onnx")
    assert_onnx_runtime_matches(path, small, onnx_export.input_names(small))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_real_models_pruned_by_half_export(name, tmp_path):
    """The embedded defaults (MiniLM, SmolLM2-135M with GQA 9/3), one-shot pruned to 50 % (heads, FFN rows).

    SmolLM2 is held to 1e-3 of its logits' scale: through its 30 layers float32 rounding alone moves
    logits by more than 1e-4 (PyTorch against itself with 1 and 2 threads, see hf_flop.onnx_export).
    """
    from hf_flop.app.data import find_model, load_task_model

    task = "seq-cls" if name == "minilm" else "causal-lm"
    model = load_task_model(find_model(name), task, num_labels=2)
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    small = compact(hf_flop.prune_oneshot(model, config, score="magnitude", reconstruct=False))
    path = export_onnx(small, tmp_path / "model.onnx")
    tolerance = {"atol": 1e-4} if name == "minilm" else {"atol": 1e-3, "scaled": True}
    assert_onnx_runtime_matches(path, small, onnx_export.input_names(small), **tolerance)


@pytest.mark.parametrize("arch, level", [("bert", "block"), ("gpt2", "embedding")])
def test_block_sparse_layers_and_factorized_embeddings_export(arch, level, tmp_path):
    config = {"embedding_cutoffs": [40]} if level == "embedding" else {"block_size": 8}
    model = get_flop_model(TINY_BUILDERS[arch](), FlopConfig(levels=[level], **config)).eval()
    prune_randomly(model, seed=6)
    small = compact(model)
    kinds = {spec["kind"] for spec in small.config.flop_plan["modules"].values()}
    assert kinds & {"block_sparse", "factorized_embedding"}
    path = export_onnx(small, tmp_path / "model.onnx")
    assert_onnx_runtime_matches(path, small, onnx_export.input_names(small))


def test_export_from_a_saved_folder(tmp_path):
    folder = save_compacted(non_uniform("llama"), tmp_path / "saved")
    path = export_onnx(folder, tmp_path / "onnx" / "model.onnx")
    assert stat.S_IMODE(path.stat().st_mode) & 0o644 == 0o644  # an ordinary file, readable by others
    assert_onnx_runtime_matches(path, AutoModelForCausalLM.from_pretrained(folder), ["input_ids", "attention_mask"])
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        export_onnx(folder, path)


def test_weights_in_a_companion_file_move_with_the_model(tmp_path, monkeypatch):
    """Models over torch's threshold (1.5 GB in torch 2.13) keep their weights in <name>.data beside the file."""
    from torch.onnx._internal.exporter import _onnx_program

    monkeypatch.setattr(_onnx_program, "_LARGE_MODEL_THRESHOLD", 0)  # private: this test fails if torch renames it
    small = compact(non_uniform("gpt2"))
    path = export_onnx(small, tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx.data").stat().st_size > 0  # the larger weights; ONNX Runtime reads them below
    assert_onnx_runtime_matches(path, small, ["input_ids", "attention_mask"])


def test_what_cannot_be_exported_is_refused_clearly(tmp_path):
    gated = non_uniform("bert")
    target = tmp_path / "model.onnx"
    with pytest.raises(ValueError, match=r"not yet compacted.*hf_flop\.export_onnx\(hf_flop\.compact\(model\), path\)"):
        export_onnx(gated, target)
    with pytest.raises(ValueError, match="not yet compacted"):  # the inner model, gated in place
        export_onnx(gated.base_model.model, target)
    with pytest.raises(ValueError, match=r"no config.json\); pass a folder written by save_compacted"):
        export_onnx(tmp_path, target)
    with pytest.raises(ValueError, match="is a folder; give the file to write"):
        export_onnx(compact(gated), tmp_path)
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        export_onnx(torch.nn.Linear(2, 2), target)
    with pytest.raises(ValueError, match="returns no logits; export_onnx writes a model with a task head"):
        export_onnx(BertModel(tiny_bert().config), target)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    model = tiny_bert().eval()  # a dense model exports too (the benchmark's baseline)
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # no difference passes
    with pytest.raises(OnnxExportError, match="ONNX Runtime's logits differ from PyTorch's.*nothing was written"):
        export_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_exporter_failure_names_its_cause(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        try:
            raise ValueError("data-dependent branch in forward\n(details)")
        except ValueError as err:  # the exporter wraps torch.export's error in generic advice
            raise RuntimeError("Failed to export the model with torch.export.\nNext steps: ...") from err

    monkeypatch.setattr(torch.onnx, "export", fail)
    message = "could not export BertForSequenceClassification: data-dependent branch in forward. Nothing was written."
    with pytest.raises(OnnxExportError, match=message):
        export_onnx(tiny_bert(), tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_packages_are_named(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a)
    )
    assert onnx_export.missing_onnx_packages(check=False) == []
    with pytest.raises(ImportError, match=r"needs onnxruntime: pip install 'hf-flop\[deploy\]'"):
        export_onnx(tiny_bert(), tmp_path / "model.onnx")


def test_export_onnx_is_public():
    assert {"export_onnx", "OnnxExportError"} <= set(hf_flop.__all__)
