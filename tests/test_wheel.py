"""A wheel install works on its own (issue 14, item 1).

The wheel is built from a copy of the sources next to a stray ``hf_flop_output/`` folder (what a
checkout holds after ``hf-flop prune``): it must hold ``hf_flop`` and its command line ``hf_flop_cli``
alone, with the card template's text (the package holds a symlink to the top-level ``model_cards/``). Then it is installed into a
fresh virtual environment outside the repository, where ``save_compacted`` and the ``hf-flop``
console script run from a working folder outside the repository, with the repository's ``hf_flop``
out of reach. The new environment borrows the test environment's installed dependencies through a
``.pth`` file rather than installing torch and transformers again: what is checked is the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from test_cli import _save_tiny, _tiny_sizes
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

import hf_flop
from hf_flop.app import data

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("hf_flop", "hf_flop_cli")
SOURCES = (*PACKAGES, "model_cards", "pyproject.toml", "README.md")  # what the build reads
TEMPLATE = "model_cards/compacted_model_card.md"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"symlinks": True} if copy is shutil.copytree else {}))
    stray = src / "hf_flop_output" / "model"
    stray.mkdir(parents=True)
    (stray / "config.json").write_text("{}")
    (src / "hf_flop_output" / "notes.py").write_text("")  # a pattern like "hf_flop*" would pack this
    dist = tmp_path_factory.mktemp("dist")
    # no build isolation: the installed setuptools builds it, so no index is needed
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    done = subprocess.run([*cmd, "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(dist.glob("hf_flop-*.whl"))


def test_the_wheel_holds_hf_flop_alone_with_the_card_template(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        info = f"hf_flop-{hf_flop.__version__}.dist-info"
        assert {n.split("/")[0] for n in names} == {*PACKAGES, info}
        assert sorted(whl.read(f"{info}/top_level.txt").decode().split()) == list(PACKAGES)
        # the template's text itself, not the symlink's target path
        assert whl.read(f"hf_flop/{TEMPLATE}") == (REPO / TEMPLATE).read_bytes()
    sources = {
        p.relative_to(REPO).as_posix()
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources <= set(names), sorted(sources - set(names))
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def _tiny_classifier(folder: Path) -> Path:
    """A tiny random BERT classifier with the (local) MiniLM tokenizer, saved for the CLI."""
    tokenizer = AutoTokenizer.from_pretrained(data.minilm_path())
    return _save_tiny(folder, BertForSequenceClassification, BertConfig(**_tiny_sizes(tokenizer)), tokenizer)


# run by the wheel's environment: hf_flop must come from there, and save_compacted must work
SAVE_SCRIPT = """
import json, stat
from pathlib import Path
import torch
from transformers import BertConfig, BertForSequenceClassification
import hf_flop

torch.manual_seed(0)
config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
model = hf_flop.get_flop_model(BertForSequenceClassification(config), hf_flop.FlopConfig(levels=["head", "row"]))
model.base_model.flop_structure_gates["head_0"].close(torch.tensor([0, 1]))  # layer 0 keeps 2 of its 4 heads
out = hf_flop.save_compacted(model, "saved")
print(json.dumps({"hf_flop": hf_flop.__file__, "mode": stat.S_IMODE(out.stat().st_mode)}))
"""


def test_a_wheel_install_runs_save_compacted_and_the_cli(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    done = subprocess.run([*install, str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the dependencies, borrowed from this environment; a plain path line in a .pth file does not run
    # that folder's own .pth files, so the repository's editable hf_flop (if installed so) stays out
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))  # same Python
    borrowed = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "borrowed_dependencies.pth").write_text("\n".join(borrowed) + "\n")

    work = tmp_path / "work"  # outside the repository, without PYTHONPATH
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    old_umask = os.umask(0o022)  # the children inherit the usual umask: saved folders are then 0o755
    try:
        done = subprocess.run(
            [str(python), "-c", SAVE_SCRIPT], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        facts = json.loads(done.stdout.strip().splitlines()[-1])
        assert Path(facts["hf_flop"]).is_relative_to(site), facts  # the wheel's copy, not the repository's
        assert facts["mode"] == 0o755
        card = (work / "saved" / "README.md").read_text()
        assert "hf-flop" in card and "| layer |" in card  # rendered from the template the wheel carries
        saved = AutoModelForSequenceClassification.from_pretrained(work / "saved")
        assert saved.config.flop_plan["layers"]["encoder.layer.0"]["heads"] == 2

        cli = venv / "bin" / "hf-flop"  # the console script the wheel declares
        csv = work / "sentiment.csv"
        rows = [f"a {'good' if i % 2 else 'bad'} film {i},{i % 2}" for i in range(40)]
        csv.write_text("\n".join(["sentence,label", *rows]) + "\n")
        argv = ["prune", "--model", str(_tiny_classifier(tmp_path / "tiny")), "--dataset", str(csv)]
        argv += ["--levels", "head,row", "--max-steps", "2", "--dense-epochs", "0", "--max-length", "16"]
        argv += ["--eval-samples", "8", "--no-plots", "--threads", "1", "--output-dir", "run"]
        done = subprocess.run([str(cli), *argv], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.umask(old_umask)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "run" / "model" / "README.md").is_file() and (work / "run" / "summary.json").is_file()
    assert (work / "run").stat().st_mode & 0o777 == 0o755
