"""FlopConfig's errors are FlopConfigError: a ValueError that names its field, so no caller parses the message."""

import pickle

import pytest

import hf_flop
from hf_flop import FlopConfig, FlopConfigError


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"levels": []}, "levels"),
        ({"levels": ["rank", "neuron"]}, "levels"),
        ({"levels": ["row", "row"]}, "levels"),
        ({"levels": ["rank", "block"]}, "levels"),
        ({"gate": "sigmoid"}, "gate"),
        ({"uniform_shapes": "yes"}, "uniform_shapes"),
        ({"levels": ["rank"], "uniform_shapes": True}, "uniform_shapes"),
        ({"target_sparsity": 1.0}, "target_sparsity"),
        ({"temperature": 0.0}, "temperature"),
        ({"limit_l": 0.1}, "limit_l"),
        ({"limit_r": 0.9}, "limit_r"),
        ({"block_size": 0}, "block_size"),
        ({"round_to": 2.5}, "round_to"),
        ({"live_threshold": 1.5}, "live_threshold"),
        ({"target_modules": "("}, "target_modules"),
        ({"exclude_modules": 3}, "exclude_modules"),
        ({"embedding_cutoffs": [8, 4]}, "embedding_cutoffs"),
    ],
)
def test_every_config_error_names_its_field(kwargs, field):
    with pytest.raises(FlopConfigError) as err:
        FlopConfig(**kwargs)
    assert isinstance(err.value, ValueError)  # existing `except ValueError` callers are unchanged
    assert err.value.field == field and field in FlopConfig.__dataclass_fields__
    assert str(err.value).startswith("FlopConfig.")  # the message is as it was: it names the field too


def test_the_error_is_public_and_pickles_with_its_field():
    assert "FlopConfigError" in hf_flop.__all__ and hf_flop.FlopConfigError is FlopConfigError
    with pytest.raises(FlopConfigError) as err:
        FlopConfig(gate="sigmoid")
    copy = pickle.loads(pickle.dumps(err.value))
    assert (type(copy), copy.field, str(copy)) == (FlopConfigError, "gate", str(err.value))
