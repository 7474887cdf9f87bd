"""``hf-flop prune --search``: the shape search before pruning, its table in the output folder and on the card."""

from __future__ import annotations

import json

import pytest
from test_cli import _run, _save_tiny, _tiny_sizes, tokenizer  # noqa: F401  (the fixtures)
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def deeper_lm_dir(tmp_path_factory, tokenizer):  # noqa: F811
    """A tiny random Llama of four layers (so one can go) with the MiniLM tokenizer."""
    sizes = {**_tiny_sizes(tokenizer), "num_hidden_layers": 4}
    config = LlamaConfig(**sizes, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    return _save_tiny(tmp_path_factory.mktemp("deeper_lm"), LlamaForCausalLM, config, tokenizer)


def test_prune_with_search_writes_the_table_and_uses_the_chosen_mix(capsys, tmp_path, deeper_lm_dir):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"the cat number {i % 7} sat on the mat near dog {i % 5}" for i in range(300)))
    out = tmp_path / "run"
    argv = ["prune", "--task", "causal-lm", "--model", str(deeper_lm_dir), "--dataset", str(text)]
    argv += ["--output-dir", str(out), "--max-steps", "1", "--max-length", "16", "--no-plots", "--no-distill"]
    argv += ["--levels", "head,row,layer", "--target", "0.4", "--search", "--search-layers", "0,0.25"]
    argv += ["--calibration-batches", "4", "--batch-size", "4", "--oneshot-score", "activation"]
    code, printed, err = _run(argv, capsys)
    assert code == 0, err
    table = json.loads((out / "shape_search.json").read_text())
    names = [c["mix"]["name"] for c in table["candidates"]]
    assert names == ["fine levels only", "1 layer"]
    chosen = table["candidates"][table["chosen"]]
    assert chosen["loss"] == min(c["loss"] for c in table["candidates"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shape_search"]["chosen"]["name"] == chosen["mix"]["name"]
    assert summary["params"]["prunable_kept"] == chosen["kept_params"]  # the trainer kept the chosen masks
    assert summary["target_check"]["met"]
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 4 - len(chosen["layers_removed"])
    card = (out / "model" / "README.md").read_text()
    assert "chosen by measurement" in card and f"{chosen['mix']['name']} {chosen['loss']:.4f} (chosen)" in card
    assert "<- chosen" in printed


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--search", "--pruning-phase", "0.5"], "--search sets the masks before the first step"),
        (["--search", "--levels", "head,row"], "add hidden and/or layer to --levels"),
        (["--search", "--levels", "row,hidden", "--calibration-batches", "2"], "at least 3 --calibration-batches"),
        (["--search-hidden", "0,0.25"], "add --search"),
    ],
)
def test_search_options_are_checked_before_anything_loads(capsys, tmp_path, extra, match):
    code, _, err = _run(["prune", "--output-dir", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and match in err


def test_search_fractions_must_be_fractions(capsys):
    with pytest.raises(SystemExit):
        _run(["prune", "--search", "--search-layers", "0,1.5"], capsys)
    assert "fractions in [0, 1)" in capsys.readouterr().err
