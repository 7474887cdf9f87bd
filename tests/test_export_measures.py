"""``hf-flop prune --export-onnx / --export-gguf``: every exported file measured on itself, in ``exports.json``
and in the card's table of exported files; a GGUF file without llama-cpp-python says it was not measured."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from test_cli import _run, sentiment_csv, tiny_cls_dir, tokenizer  # noqa: F401 (fixtures)
from tiny_models import tiny_bpe_tokenizer, tiny_llama
from transformers import AutoTokenizer, DataCollatorWithPadding

import hf_flop_cli as cli
from hf_flop.app import job as prune_job

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
NOT_MEASURED = "not measured: llama-cpp-python is not installed"


@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory):
    """A tiny random Llama-GQA with the tiny byte-level BPE tokenizer (llama.cpp's kind), and a corpus."""
    folder = tmp_path_factory.mktemp("tiny_bpe_lm")
    tiny_llama().save_pretrained(folder)
    tiny_bpe_tokenizer().save_pretrained(folder)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"the cat sat on the mat {i % 7} times, and the dog sat on a log." for i in range(200)))
    return folder, corpus


def _exports(out) -> dict[str, dict]:
    """``exports.json``'s rows by file name, each checked to state the size the file has on disk."""
    rows = {row["file"]: row for row in json.loads((out / "exports.json").read_text())["files"]}
    for name, row in rows.items():
        assert row["bytes"] == (out / name).stat().st_size > 0
    return rows


def _card_row(out, name: str) -> str:
    """The card's table line of the exported file ``name``."""
    card = (out / "model" / "README.md").read_text()
    assert "## Exported files" in card and "| file | format | quantization | size (MB) | metric | speed |" in card
    (line,) = [line for line in card.splitlines() if line.startswith(f"| `{name}` |")]
    return line


def test_an_int8_onnx_file_is_measured_on_itself(capsys, tmp_path, tiny_cls_dir, sentiment_csv):  # noqa: F811
    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(out)]
    argv += ["--levels", "head,row", "--max-steps", "2", "--dense-epochs", "1", "--max-length", "16"]
    argv += ["--eval-samples", "8", "--no-plots", "--export-onnx", "--onnx-quantization", "int8"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exports"] == "exports.json" and "exports.json" in " ".join(stdout.split())
    (row,) = _exports(out).values()
    assert (row["file"], row["format"], row["quantization"]) == ("model.onnx", "onnx", "int8")
    assert row["runtime"] == f"onnxruntime {ort.__version__}"
    assert set(row["latency_ms"]) == {"1", "32"} and all(ms > 0 for ms in row["latency_ms"].values())

    # the accuracy is the int8 file's: recomputed here through ONNX Runtime on the job's evaluation rows
    saved_tokenizer = AutoTokenizer.from_pretrained(out / "model")
    args = cli.build_parser().parse_args(argv)
    cli._fill_task_defaults(args)
    report = prune_job.prepare_data(args, saved_tokenizer)["report"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = DataCollatorWithPadding(saved_tokenizer)([report[i] for i in range(len(report))])
    names = [node.name for node in session.get_inputs()]
    (logits,) = session.run(["logits"], {name: batch[name].numpy() for name in names})
    accuracy = float(np.mean(logits.argmax(-1) == batch["labels"].numpy()))
    metric = row["metric"]
    assert metric["name"] == "accuracy" and metric["value"] == pytest.approx(accuracy, abs=1e-12)
    assert metric["pytorch"] == summary["results"]["pruned"] and metric["examples"] == len(report) == 8

    line = _card_row(out, "model.onnx")
    assert f"| ONNX | int8 | {row['bytes'] / 1e6:.2f} |" in line
    assert f"accuracy {accuracy:.4f} (PyTorch {metric['pytorch']:.4f})" in line
    assert f"batch 32: {row['latency_ms']['32']:.2f} ms (ONNX Runtime, 1 thread, 16 tokens)" in line


def test_a_gguf_file_without_llama_cpp_is_not_measured(capsys, tmp_path, monkeypatch, tiny_lm_folder):
    """Both exports of a causal LM: the ONNX file's perplexity through ONNX Runtime, the GGUF file's size and
    a row saying why nothing else was measured (no number from elsewhere)."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as without llama-cpp-python
    folder, corpus = tiny_lm_folder
    out = tmp_path / "run"
    argv = ["prune", "--task", "causal-lm", "--model", str(folder), "--dataset", str(corpus), "--levels", "head,row"]
    argv += ["--output-dir", str(out), "--max-steps", "2", "--max-length", "16", "--no-plots", "--no-distill"]
    argv += ["--eval-samples", "8", "--export-gguf", "--gguf-quantization", "q8_0", "--export-onnx"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    rows = _exports(out)
    assert list(rows) == ["model.onnx", "model.gguf"]
    gguf = rows["model.gguf"]
    assert gguf == {
        "file": "model.gguf",
        "format": "gguf",
        "quantization": "q8_0",
        "bytes": (out / "model.gguf").stat().st_size,
        "not_measured": "llama-cpp-python is not installed",
    }
    assert "model.gguf not measured: llama-cpp-python is not installed" in " ".join(stdout.split())
    line = _card_row(out, "model.gguf")
    assert f"| GGUF | q8_0 | {gguf['bytes'] / 1e6:.2f} | {NOT_MEASURED} | {NOT_MEASURED} |" in line

    onnx = rows["model.onnx"]
    assert onnx["quantization"] == "float32" and onnx["metric"]["name"] == "perplexity"
    # float32 ONNX Runtime against the same model in PyTorch, on the same rows: rounding apart, equal
    pytorch = json.loads((out / "summary.json").read_text())["results"]["pruned"]
    assert onnx["metric"]["value"] == pytest.approx(pytorch, rel=1e-4) and onnx["metric"]["pytorch"] == pytorch
    assert f"perplexity {onnx['metric']['value']:.4f}" in _card_row(out, "model.onnx")


_PUSH_JOB = r"""
import json, os, sys
os.environ["HF_TOKEN"] = sys.argv[1]
import hf_flop_cli as cli
code = cli.main(sys.argv[2:])
print("RESULT" + json.dumps({"code": code}))
"""


def test_push_to_hub_sends_the_exported_files_with_the_model(tmp_path, tiny_cls_dir, sentiment_csv):  # noqa: F811
    """--push-to-hub: the model folder and, at the repository root, the files its card's table describes."""
    from hub_server import HubServer
    from test_hub import TOKEN, run_child

    out = tmp_path / "run"
    argv = ["prune", "--model", str(tiny_cls_dir), "--dataset", str(sentiment_csv[0]), "--output-dir", str(out)]
    argv += ["--levels", "head,row", "--max-steps", "2", "--dense-epochs", "1", "--max-length", "16"]
    argv += ["--eval-samples", "8", "--no-plots", "--export-onnx", "--push-to-hub", "--repo-id", "tester/tiny-cls"]
    with HubServer() as hub:
        assert run_child(_PUSH_JOB, hub.url, tmp_path, TOKEN, *argv) == {"code": 0}
        remote = hub.files("tester/tiny-cls")
    local = {str(p.relative_to(out / "model")): p.read_bytes() for p in (out / "model").rglob("*") if p.is_file()}
    local |= {name: (out / name).read_bytes() for name in ("model.onnx", "exports.json")}
    assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
    assert "| `model.onnx` |" in remote["README.md"].decode()  # the card's table names a file the repo has
