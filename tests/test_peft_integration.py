"""The PEFT entry points FLOP relies on. If a PEFT upgrade breaks the registration, these fail loudly."""

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from tiny_models import tiny_inputs, tiny_llama

import hf_flop
from hf_flop import FlopConfig, FlopModel
from hf_flop.registration import register


def test_registration_is_complete_and_idempotent():
    register()
    register()
    assert PeftType("FLOP") is PeftType.FLOP
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.FLOP] is FlopConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.FLOP] is FlopModel


def test_get_peft_model_equals_get_flop_model():
    a = get_peft_model(tiny_llama(), FlopConfig(levels=["rank", "row"]))
    b = hf_flop.get_flop_model(tiny_llama(), FlopConfig(levels=["rank", "row"]))
    assert isinstance(a, PeftModel) and isinstance(a.base_model, FlopModel)
    assert a.state_dict().keys() == b.state_dict().keys()


def _train_a_little(model, steps=3):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        out = model(**tiny_inputs(), labels=tiny_inputs()["input_ids"])
        loss = out.loss - hf_flop.expected_sparsity(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("train_base", [True, False])
def test_adapter_saved_mid_training_restores_identical_outputs(tmp_path, train_base):
    config = FlopConfig(levels=["rank", "head", "row"], train_base=train_base)
    model = hf_flop.get_flop_model(tiny_llama(), config)
    initial_row_gate = model.base_model.flop_structure_gates["row_0"].log_alpha.detach().clone()
    _train_a_little(model)
    model.eval()
    with torch.no_grad():
        expected = model(**tiny_inputs()).logits
    model.save_pretrained(tmp_path)
    assert PeftConfig.from_pretrained(tmp_path).peft_type == "FLOP"

    restored = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        got = restored(**tiny_inputs()).logits
    assert torch.allclose(got, expected, atol=1e-5)
    # the gates really were restored (not still at their initial values)
    gates = restored.base_model.flop_structure_gates
    assert not torch.allclose(gates["row_0"].log_alpha, initial_row_gate, atol=1e-2)


def test_train_base_controls_trainable_parameters():
    full = hf_flop.get_flop_model(tiny_llama(), FlopConfig(train_base=True))
    names = {n for n, p in full.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in names)
    assert not any(n.endswith("base_layer.weight") for n in names)
    adapters_only = hf_flop.get_flop_model(tiny_llama(), FlopConfig(train_base=False, levels=["rank", "head"]))
    names = {n for n, p in adapters_only.named_parameters() if p.requires_grad}
    assert names and all("flop_" in n for n in names)
    assert any("flop_structure_gates" in n for n in names)


def test_peft_version_is_one_we_checked():
    major, minor = (int(x) for x in peft.__version__.split(".")[:2])
    assert (major, minor) >= (0, 21)
