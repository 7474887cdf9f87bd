import pytest

from hf_flop import FlopConfig


def test_round_trip(tmp_path):
    config = FlopConfig(target_modules=["q_proj", "v_proj"], levels=["rank", "head"], target_sparsity=0.75, round_to=8)
    config.save_pretrained(tmp_path)
    loaded = FlopConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.peft_type == "FLOP"
    uniform = FlopConfig(levels=["head", "row"], uniform_shapes=True)
    uniform.save_pretrained(tmp_path / "uniform")
    assert FlopConfig.from_pretrained(tmp_path / "uniform").uniform_shapes is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_sparsity": 1.0}, r"target_sparsity=1.0 is outside \[0, 1\)"),
        ({"target_sparsity": -0.1}, "target_sparsity"),
        ({"levels": ["rank", "neurons"]}, r"levels entry='neurons'.*'head'"),
        ({"levels": []}, "levels is empty"),
        ({"levels": ["rank", "block"]}, "two-step pipeline"),
        ({"gate": "l0"}, r"gate='l0'.*hard_concrete"),
        ({"round_to": 0}, "round_to"),
        ({"temperature": 0}, "temperature"),
        ({"target_modules": "q_proj("}, "not a valid regex"),
        ({"embedding_cutoffs": [100, 50]}, "strictly increasing"),
        ({"uniform_shapes": "yes", "levels": ["row"]}, "uniform_shapes='yes' must be True or False"),
        (
            {"uniform_shapes": True},
            r"uniform_shapes=True allows levels \['head', 'query_head', 'row'.*\] only, got \['rank'\]",
        ),
        ({"uniform_shapes": True, "levels": ["head", "block"]}, r"got \['block'\].*uniform_shapes=False"),
        ({"uniform_shapes": True, "levels": ["row", "embedding"]}, r"got \['embedding'\]"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlopConfig(**kwargs)
