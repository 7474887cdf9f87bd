"""export_gguf's warnings are GGUFExportWarning objects with fields, and its errors name parameters in the
caller's words (``names=``), so a caller never rewrites or parses the library's text."""

from __future__ import annotations

import pickle
import warnings

import pytest
from tiny_models import tiny_bpe_tokenizer, tiny_mistral
from transformers import AutoTokenizer

from hf_flop.app.data import minilm_path

pytest.importorskip("gguf")

from hf_flop.export_gguf import GGUFExportWarning, check_exportable, export_gguf  # noqa: E402

CLI_NAMES = {"tokenizer_gguf": "--gguf-tokenizer", "dtype": "--gguf-dtype"}


def test_the_densify_warning_carries_a_note_and_the_parameter_to_change(tmp_path):
    from test_export_gguf import non_uniform

    _, small = non_uniform(levels=("rank", "head", "row"))
    with pytest.warns(GGUFExportWarning) as record:
        export_gguf(small, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer())
    warning = record[0].message
    assert isinstance(warning, UserWarning) and warning.parameter == "densify"
    assert str(warning).startswith("export_gguf: ") and str(warning).endswith("; densify=False refuses.")
    assert warning.note.endswith("runs at its pruned size.") and "densify" not in warning.note
    assert not warning.note.startswith("export_gguf") and warning.note.removesuffix(".") in str(warning)
    copy = pickle.loads(pickle.dumps(warning))
    assert (str(copy), copy.note, copy.parameter) == (str(warning), warning.note, warning.parameter)


def test_the_sliding_window_warning_has_no_parameter_to_change(tmp_path):
    model = tiny_mistral()
    model.config.sliding_window = 16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_exportable(model, tokenizer=tiny_bpe_tokenizer())
    (warning,) = [w.message for w in caught if isinstance(w.message, GGUFExportWarning)]
    assert warning.parameter is None and warning.note == str(warning) and "sliding window of 16" in warning.note


def test_errors_name_parameters_as_the_caller_calls_them(tmp_path):
    model = tiny_mistral()
    wordpiece = AutoTokenizer.from_pretrained(minilm_path())
    with pytest.raises(ValueError, match="byte-level BPE") as plain:
        check_exportable(model, tokenizer=wordpiece)
    assert "pass tokenizer_gguf= a GGUF file" in str(plain.value)
    with pytest.raises(ValueError, match="byte-level BPE") as named:
        check_exportable(model, tokenizer=wordpiece, names=CLI_NAMES)
    assert "pass --gguf-tokenizer a GGUF file" in str(named.value) and "tokenizer_gguf" not in str(named.value)
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match=f"^--gguf-tokenizer {missing} does not exist"):
        check_exportable(model, tokenizer_gguf=missing, names=CLI_NAMES)
    with pytest.raises(ValueError, match="^export_gguf: --gguf-dtype='f64' is not one of"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer(), dtype="f64", names=CLI_NAMES)
    with pytest.raises(TypeError, match="names must be a mapping"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tiny_bpe_tokenizer(), names=["--gguf-dtype"])
