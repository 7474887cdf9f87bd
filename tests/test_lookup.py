"""find_flop_model lives in hf_flop.lookup, below every module that needs it (accounting, compaction, scores, ...)."""

import ast
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

import hf_flop
import hf_flop.accounting
import hf_flop.model
from hf_flop import FlopConfig, FlopModel, get_flop_model
from hf_flop.lookup import FlopModelBase, find_flop_model


class _Wrapper(torch.nn.Module):
    """What DistributedDataParallel looks like from outside: the model is its ``module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_the_tuner_is_found_inside_its_wrappers():
    peft_model = get_flop_model(tiny_llama(), FlopConfig(levels=["row"]))
    flop_model = peft_model.base_model
    assert isinstance(flop_model, FlopModel) and isinstance(flop_model, FlopModelBase)
    for wrapped in (peft_model, flop_model, _Wrapper(peft_model)):
        assert find_flop_model(wrapped) is flop_model
    with pytest.raises(ValueError, match="LlamaForCausalLM has no FLOP layers; wrap it first"):
        find_flop_model(tiny_llama())


def test_its_old_homes_still_give_it():
    assert hf_flop.model.find_flop_model is find_flop_model
    assert hf_flop.accounting.find_flop_model is find_flop_model


def test_lookup_imports_nothing_of_hf_flop():
    source = Path(hf_flop.lookup.__file__).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert not node.level and not (node.module or "").startswith("hf_flop"), ast.unparse(node)
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("hf_flop") for alias in node.names), ast.unparse(node)
