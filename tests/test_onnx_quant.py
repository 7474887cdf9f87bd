"""``export_onnx(quantization="int8")``: ONNX Runtime's int8 model of a compacted tiny BERT classifier predicts
as PyTorch does on most inputs, from a smaller file; bad quantizations are refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_bert

from hf_flop import FlopConfig, compact, export_onnx, prune_oneshot

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def classifier():
    """A tiny BERT classifier pruned one-shot to per-layer shapes and compacted, with its logits spread out
    (classifier weights x 20): a random head otherwise gives near-ties that any rounding flips."""
    model = tiny_bert().eval()
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, VOCAB, (4, 12), generator=g)} for _ in range(4)]
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    return compact(prune_oneshot(model, config, batches, "activation", reconstruct=False)).eval()


def weight_bytes(path) -> int:
    import onnx

    return sum(len(t.raw_data) + 4 * len(t.float_data) for t in onnx.load(str(path)).graph.initializer)


def test_int8_model_predicts_as_pytorch_from_a_smaller_file(tmp_path):
    model = classifier()
    full = export_onnx(model, tmp_path / "f32.onnx")
    small = export_onnx(model, tmp_path / "int8.onnx", quantization="int8")
    assert small.stat().st_size < 0.85 * full.stat().st_size  # a tiny model's file is mostly its nodes' metadata
    assert weight_bytes(small) < 0.35 * weight_bytes(full)  # the weights themselves: int8 for float32
    session = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (200, 10), generator=g)
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    (logits,) = session.run(["logits"], {n: feed[n].numpy() for n in names})
    with torch.no_grad():
        reference = model(**{n: feed[n] for n in names}).logits.numpy()
    agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    assert agree >= 0.9, agree
    error = float(np.abs(logits - reference).max() / np.abs(reference).max())
    assert 0 < error < 0.1, error  # int8 rounding: not the float graph, not far from it
    print(
        f"\nint8 agrees on {agree:.1%}, max |logit error| {error:.2%} of the largest; "
        f"{small.stat().st_size} vs {full.stat().st_size} bytes, weights {weight_bytes(small)} vs {weight_bytes(full)}"
    )


def test_static_int8_with_calibration_batches_predicts_as_pytorch(tmp_path):
    model = classifier()
    g = torch.Generator().manual_seed(3)
    calibration = [{"input_ids": torch.randint(1, VOCAB, (4, 10), generator=g)} for _ in range(8)]
    path = export_onnx(model, tmp_path / "static.onnx", quantization="int8-static", calibration=calibration)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    ids = torch.randint(1, VOCAB, (200, 10), generator=g)
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    (logits,) = session.run(["logits"], {n: feed[n].numpy() for n in names})
    with torch.no_grad():
        reference = model(**{n: feed[n] for n in names}).logits.numpy()
    agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
    error = float(np.abs(logits - reference).max() / np.abs(reference).max())
    print(f"\nstatic int8 agrees on {agree:.1%}, max |logit error| {error:.2%} of the largest")
    assert agree >= 0.9 and 0 < error < 0.15
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in __import__("onnx").load(str(path)).graph.node}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantization": "q8_0"}, "export_gguf's"),
        ({"quantization": "int4"}, "None .* or 'int8'"),
        ({"quantization": "int8-static"}, "pass calibration="),
        ({"quantization": "int8", "calibration": [{}]}, "calibration= is for quantization='int8-static'"),
    ],
)
def test_refused_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(tmp_path / "no-such-folder", tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []
