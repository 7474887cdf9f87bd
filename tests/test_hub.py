"""save_compacted (atomic folder, model card, tokenizer) and pushing to a local Hub through the real client.

The Hub is ``tests/hub_server.py`` on 127.0.0.1. ``huggingface_hub`` reads ``HF_ENDPOINT`` when it is
imported, so every Hub round trip runs in a child process started with that variable set.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, validate_card
from huggingface_hub import ModelCard
from test_compact import logits, pruned
from tiny_models import TINY_BUILDERS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

import hf_flop
from hf_flop import save_compacted, sparsity_report

TESTS = Path(__file__).parent
TOKEN = "hf_test_write_token"


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(40)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


# --- saving locally ---------------------------------------------------------------------------------
def test_save_compacted_writes_a_complete_folder_with_a_card(tmp_path):
    model = pruned("bert", ["rank", "head", "row"], seed=4)
    reference = logits(model)
    out = save_compacted(
        model,
        tmp_path / "tiny-bert",
        repo_id="tester/tiny-bert",
        tokenizer=tiny_tokenizer(),
        eval_results={"accuracy": 0.8125},
        eval_dataset="rotten_tomatoes",
        speedup={"batch 1": 1.9, "batch 32": 1.4},
    )
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", "modeling_flop.py"} <= files
    assert not any(f.endswith(".bin") for f in files)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-bert"]  # no temporary folder left behind

    model_back = AutoModelForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(logits(model_back), reference, atol=1e-4, rtol=0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w3 w7 w9")["input_ids"] == [5, 9, 11]

    text = (out / "README.md").read_text()
    assert validate_card(text) == []
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert {"hf-flop", "low-rank", "head-pruning", "row-pruning", "custom_code"} <= set(data["tags"])
    metrics = data["model-index"][0]["results"][0]
    assert metrics["metrics"] == [{"type": "accuracy", "value": 0.8125}]
    assert metrics["dataset"]["name"] == "rotten_tomatoes"
    report = sparsity_report(model)
    assert f"{report.deterministic_kept_params:,}" in text and f"{report.prunable_params:,}" in text
    for name, info in report.modules.items():  # one table row per pruned linear, with its kept count
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert row.rstrip().endswith(f"| {info.kept_params:,} / {info.shape[0] * info.shape[1]:,} |")
    assert "1.90x" in text and "1.40x" in text
    assert "trust_remote_code=True" in text and '"target_sparsity": 0.5' in text


def test_existing_folder_is_kept_without_overwrite(tmp_path):
    model = pruned("gpt2", ["rank"], seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        save_compacted(model, out)
    assert folder_digest(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}
    save_compacted(model, out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_saved_folder_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)  # the usual umask; the folder follows it as any new folder does (tests/test_files.py)
    try:
        out = save_compacted(pruned("bert", ["rank"], seed=3), tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # readable by others, like any saved model
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644


def test_a_failed_save_changes_nothing(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "half-written").write_text("x")
            raise OSError("disk full")

    model = pruned("llama", ["head", "row"], seed=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        save_compacted(model, out, overwrite=True, tokenizer=BrokenTokenizer())
    assert folder_digest(out) == {"old.txt": hashlib.sha256(b"old").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    model = pruned("bert", ["rank"])
    with pytest.raises(ValueError, match="no FLOP layers"):
        save_compacted(TINY_BUILDERS["bert"](), tmp_path / "a")
    with pytest.raises(ValueError, match="needs repo_id"):
        save_compacted(model, tmp_path / "b", push_to_hub=True)
    with pytest.raises(ValueError, match="eval_results must map names to numbers"):
        save_compacted(model, tmp_path / "c", eval_results={"accuracy": "high"})
    with pytest.raises(ValueError, match="not a Hub repository id"):
        save_compacted(model, tmp_path / "d", repo_id="a/b/c")
    with pytest.raises(TypeError, match="output_dir must be a path"):
        save_compacted(model, 42)
    with pytest.raises(ValueError, match="exports must be a list of mappings with file, format, quantization, bytes"):
        save_compacted(model, tmp_path / "e", exports=[{"file": "model.onnx", "bytes": 10}])
    assert list(tmp_path.iterdir()) == []


# --- the Hub, through the real client in child processes ----------------------------------------------
def run_child(code: str, endpoint: str, tmp_path: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "HF_TOKEN"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / "hf_home"),  # fresh cache and no stored token
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT") :])


_PUSH_AND_PULL = r"""
import json, sys, torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM
import hf_flop
from test_compact import logits, pruned
model = pruned("llama", ["rank", "head", "row"], seed=7)
reference = logits(model)
folder = hf_flop.save_compacted(model, sys.argv[1], push_to_hub=True, repo_id="tester/tiny-llama",
                                token=sys.argv[2], private=False, eval_results={"perplexity": 91.5})
card = ModelCard.load("tester/tiny-llama")
card.validate()  # the Hub's /api/validate-yaml
back = AutoModelForCausalLM.from_pretrained("tester/tiny-llama")
torch.save((reference, logits(back)), sys.argv[1] + ".pt")
print("RESULT" + json.dumps({"diff": (logits(back) - reference).abs().max().item(),
                             "pipeline_tag": card.data.pipeline_tag, "class": type(back).__name__}))
"""

_PULL_WITHOUT_HF_FLOP = r"""
import json, sys, torch
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_flop":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
from transformers import AutoModelForCausalLM
from tiny_models import tiny_inputs
back = AutoModelForCausalLM.from_pretrained("tester/tiny-llama", trust_remote_code=True)
reference, _ = torch.load(sys.argv[1] + ".pt")
with torch.no_grad():
    diff = (back(**tiny_inputs()).logits - reference).abs().max().item()
print("RESULT" + json.dumps({"diff": diff, "module": type(back).__module__,
                             "hf_flop": any(k.startswith("hf_flop") for k in sys.modules)}))
"""


def test_push_then_load_from_the_hub(tmp_path):
    with HubServer() as hub:
        folder = tmp_path / "tiny-llama"
        out = run_child(_PUSH_AND_PULL, hub.url, tmp_path, str(folder), TOKEN)
        assert out["diff"] < 1e-4 and out["pipeline_tag"] == "text-generation"
        assert out["class"] == "FlopLlamaForCausalLM"
        remote = hub.files("tester/tiny-llama")
        local = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        assert {k: v for k, v in remote.items() if k != ".gitattributes"} == local
        assert ("POST", "/api/validate-yaml", 200) in hub.state.log

        out = run_child(_PULL_WITHOUT_HF_FLOP, hub.url, tmp_path, str(folder))
        assert out["diff"] < 1e-4 and not out["hf_flop"]
        assert out["module"].startswith("transformers_modules.")


_PUSH_FAILURES = r"""
import json, sys
from hub_server import HubServer
import hf_flop
folder, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
results = {}

def attempt(name, **kwargs):
    try:
        hf_flop.push_compacted(folder, "tester/tiny-gpt2", **kwargs)
        results[name] = "ok"
    except hf_flop.PushToHubError as err:
        results[name] = str(err)

attempt("down", token=token)  # nothing listens on the port yet
hub = HubServer(port).start()
hub.fail("POST", "/api/repos/create", 500)
attempt("http_500", token=token)
attempt("bad_token", token="hf_not_a_real_token")
attempt("second_push", token=token)
results["files"] = sorted(hub.files("tester/tiny-gpt2"))
hub.stop()
print("RESULT" + json.dumps(results))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_failures_are_clear_and_a_later_push_succeeds(tmp_path):
    folder = save_compacted(pruned("gpt2", ["rank", "row"], seed=5), tmp_path / "tiny-gpt2")
    before = folder_digest(folder)
    port = _free_port()
    out = run_child(_PUSH_FAILURES, f"http://127.0.0.1:{port}", tmp_path, str(folder), str(port), TOKEN)
    retry = f"push it again with hf_flop.push_compacted('{folder}', 'tester/tiny-gpt2')"
    assert "could not reach the Hub" in out["down"] and retry in out["down"]
    assert "HTTP 500" in out["http_500"] and "The local folder is complete" in out["http_500"]
    assert "rejected the token (HTTP 401)" in out["bad_token"], out["bad_token"]
    assert out["second_push"] == "ok"
    assert set(os.listdir(folder)) <= set(out["files"])
    assert folder_digest(folder) == before  # failed pushes never touch the folder


def test_card_validator_rejects_broken_metadata():
    assert validate_card("no metadata") != []
    assert validate_card("---\ntags: [a, {b: 1}]\n---\n") != []
    assert validate_card("---\npipeline_tag: text-generation\nmodel-index:\n- name: x\n  results:\n  - task: {}\n---\n")
    assert validate_card("---\nlibrary_name: transformers\ntags: [a]\n---\n# ok\n") == []


def test_push_needs_a_saved_folder(tmp_path):
    with pytest.raises(ValueError, match="not a saved model folder"):
        hf_flop.push_compacted(tmp_path, "tester/x")


# --- what the card says (issue 15) ----------------------------------------------------------------------
def _card_code(text: str) -> str:
    return text.split("## How to load it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


_RUN_SNIPPET = r"""
import json, sys
if sys.argv[2] == "hidden":  # as on a machine without hf_flop
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_flop":
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, Hide())
else:
    import hf_flop
import io, contextlib
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    exec(sys.argv[1])
    if sys.argv[2] != "hidden":
        from transformers import AutoTokenizer, pipeline
        AutoTokenizer.from_pretrained(sys.argv[3])  # no trust_remote_code: hf_flop's classes are registered
        print(pipeline("text-classification", model=sys.argv[3])("w3 w4")[0]["label"])
print("RESULT" + json.dumps({"printed": printed.getvalue(), "model": type(model).__name__}))
"""


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """A tiny BERT classifier loaded with the dataset's label names, pruned and saved with a tokenizer."""
    from hf_flop.app.data import load_task_model

    root = tmp_path_factory.mktemp("labelled")
    TINY_BUILDERS["bert"]().save_pretrained(root / "base")
    (root / "base" / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a base model\n")
    model = load_task_model(str(root / "base"), "seq-cls", 2, label_names=["negative", "positive"])
    assert model.config.id2label == {0: "negative", 1: "positive"} and model.config.label2id["positive"] == 1
    flop = hf_flop.get_flop_model(model, hf_flop.FlopConfig(levels=["head", "row"]))
    from test_compact import prune_randomly

    prune_randomly(flop, seed=3)
    out = save_compacted(
        flop,
        root / "saved",
        tokenizer=tiny_tokenizer(),
        eval_results={"accuracy": 0.8125},
        baseline_results={"accuracy": 0.8438},
        eval_dataset="my sentences",
        eval_split="test",
        training={"pruning": "30 steps"},
    )
    return out


def test_card_shows_the_baseline_the_procedure_and_the_license(labelled_folder):
    text = (labelled_folder / "README.md").read_text()
    assert validate_card(text) == []
    assert "| accuracy | 0.8438 | 0.8125 | -0.0313 |" in text  # dense, pruned, change
    assert "## Training procedure" in text and "- pruning: 30 steps" in text
    assert "Measured on my sentences (test split)." in text
    data = ModelCard.load(labelled_folder / "README.md").data.to_dict()
    assert data["license"] == "mit"  # from the base model's README metadata
    result = data["model-index"][0]["results"][0]
    assert result["metrics"] == [{"type": "accuracy", "value": 0.8125}]  # the model-index holds this model's result
    assert result["dataset"] == {"name": "my sentences", "type": "custom", "split": "test"}  # no id claimed
    assert "Classes: 0 = negative, 1 = positive" in text


def test_card_text_matches_the_model(labelled_folder, tmp_path):
    """No "low-rank" for a head/row model; the code files listed are the ones saved; the target line."""
    text = (labelled_folder / "README.md").read_text()
    data = ModelCard.load(labelled_folder / "README.md").data.to_dict()
    assert "low-rank" not in data["tags"] and "low-rank" not in text.lower()
    shipped = sorted(p.name for p in labelled_folder.glob("*.py"))
    listed = text.split("small code files (", 1)[1].split(";", 1)[0]
    assert sorted(name.strip(" `") for name in listed.split(",")) == shipped and len(shipped) == 4
    assert "4 small code files" in text
    assert "Target sparsity 0.500: met (within 0.031)." in text  # these random gates happen to be on target
    model = pruned("bert", ["rank"], seed=4)
    check = hf_flop.accounting.check_target(model)
    low_rank = save_compacted(model, tmp_path / "rank")
    text = (low_rank / "README.md").read_text()
    assert "low-rank" in ModelCard.load(low_rank / "README.md").data.to_dict()["tags"]
    assert "pruned matrices are stored low-rank" in text
    assert not check.met and f"Target sparsity 0.500: **missed**: {check.describe()}." in text


def test_card_snippet_loads_the_saved_folder_and_names_the_classes(labelled_folder, tmp_path):
    code = _card_code((labelled_folder / "README.md").read_text())
    assert repr(str(labelled_folder.absolute())) in code  # the folder, not a repository that does not exist
    assert "AutoTokenizer.from_pretrained" in code
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=str(TESTS.parent))
    for mode in ("hidden", "imported"):
        done = subprocess.run(
            [sys.executable, "-c", _RUN_SNIPPET, code, mode, str(labelled_folder)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
        assert "Do you wish to run the custom code" not in done.stdout + done.stderr, mode
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
        assert lines, done.stderr[-3000:]
        out = json.loads(lines[0][len("RESULT") :])
        assert out["model"] == "FlopBertForSequenceClassification"
        answers = out["printed"].split()
        assert answers and all(a in ("negative", "positive") for a in answers), out  # names, not LABEL_1


def test_card_snippet_names_the_repository_when_pushing(tmp_path):
    out = save_compacted(pruned("llama", ["head", "row"], seed=1), tmp_path / "m", load_from="me/tiny-llama")
    code = _card_code((out / "README.md").read_text())
    assert "from_pretrained('me/tiny-llama'" in code and str(tmp_path) not in code


def test_minilm_default_card_license_and_base_model():
    from transformers import AutoModel

    from hf_flop.app.data import minilm_path
    from hf_flop.hub import base_model_license

    assert base_model_license(AutoModel.from_pretrained(minilm_path())) == "apache-2.0"


_PUSH_EXTRAS = r"""
import json, sys
import hf_flop
folder, token, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
hf_flop.push_compacted(folder, "tester/tiny-gpt2", token=token, extra_files=extra)
print("RESULT" + json.dumps({"ok": True}))
"""


def test_extra_files_go_to_the_repository_root_in_the_same_push(tmp_path):
    folder = save_compacted(pruned("gpt2", ["rank", "row"], seed=5), tmp_path / "tiny-gpt2")
    exported = tmp_path / "model.gguf"
    exported.write_bytes(b"GGUF and some bytes")
    with pytest.raises(ValueError, match=r"are not files; pass the exported files"):
        hf_flop.push_compacted(folder, "tester/x", extra_files=[tmp_path / "missing.onnx"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\['config.json'\] would overwrite a file of the same name"):
        hf_flop.push_compacted(folder, "tester/x", extra_files=[tmp_path / "config.json"])
    with HubServer() as hub:
        assert run_child(_PUSH_EXTRAS, hub.url, tmp_path, str(folder), TOKEN, str(exported)) == {"ok": True}
        remote = hub.files("tester/tiny-gpt2")
        commits = [entry for entry in hub.state.log if entry[0] == "POST" and "/commit/" in entry[1]]
    assert remote["model.gguf"] == exported.read_bytes()
    local = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert {k: v for k, v in remote.items() if k not in (".gitattributes", "model.gguf")} == local
    assert len(commits) == 1, hub.state.log  # one commit: the repository never shows the card without its files
