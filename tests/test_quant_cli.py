"""``hf-flop prune --gguf-quantization / --onnx-quantization``: a quantized model.gguf, and the refusals, before training."""

from __future__ import annotations

import json
import sys

import pytest
from test_cli import _one_line_error, _run, no_training  # noqa: F401 (a fixture)
from test_export_gguf import tiny_lm_folder, tokenizer  # noqa: F401 (fixtures)

import hf_flop_cli.choices
from hf_flop import gguf_quant, onnx_quant

gguf = pytest.importorskip("gguf")


def _argv(folder, corpus, out) -> list[str]:
    argv = ["prune", "--task", "causal-lm", "--model", str(folder), "--dataset", str(corpus), "--levels", "head,row"]
    return argv + ["--output-dir", str(out), "--max-steps", "2", "--max-length", "16", "--no-plots", "--no-distill"]


def test_the_cli_choices_are_the_librarys():
    choices = hf_flop_cli.choices
    assert choices.GGUF_QUANTIZATIONS == tuple(gguf_quant.PYTHON_TYPES)
    assert choices.GGUF_K_QUANTIZATIONS == tuple(gguf_quant.LLAMA_CPP_TYPES)
    assert set(choices.ONNX_QUANTIZATIONS) == set(onnx_quant.QUANTIZATIONS) - {None, "int8-static"}


def test_the_cli_writes_a_q8_0_model_gguf(tmp_path, tiny_lm_folder, capsys):  # noqa: F811
    folder, corpus = tiny_lm_folder
    out = tmp_path / "run"
    code, _, err = _run([*_argv(folder, corpus, out), "--export-gguf", "--gguf-quantization", "q8_0"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["gguf"]["quantization"] == "q8_0"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out / "model.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0"  # 32 wide: fits
    assert types["output_norm.weight"] == "F32"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--gguf-quantization", "q8_0"], "--gguf-quantization quantizes model.gguf: add --export-gguf"),
        (["--onnx-quantization", "int8"], "--onnx-quantization quantizes model.onnx: add --export-onnx"),
        (
            ["--export-gguf", "--gguf-dtype", "f16", "--gguf-quantization", "q8_0"],
            "--gguf-dtype='f16' and --gguf-quantization='q8_0' disagree",
        ),
        (["--export-gguf", "--gguf-quantization", "q4_k_m"], "'q4_k_m' is a K-quant"),
    ],
    ids=["gguf-without-export", "onnx-without-export", "dtype-disagrees", "k-quant-without-llama-cpp"],
)
def test_bad_combinations_are_refused_before_training(
    tmp_path,
    tiny_lm_folder,  # noqa: F811
    capsys,
    monkeypatch,
    no_training,  # noqa: F811
    extra,
    fragment,
):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as without llama-cpp-python
    folder, corpus = tiny_lm_folder
    out = tmp_path / "run"
    code, _, err = _run([*_argv(folder, corpus, out), *extra], capsys)
    _one_line_error(code, err, fragment)
    assert not out.exists()
