import math

import pytest
import torch

from hf_flop.gates import HardConcreteGate, TopKGate


@pytest.mark.parametrize("n", [1, 12, 384, 1536, 11008, 50000])
@pytest.mark.parametrize("beta", [1.0, 2 / 3])
def test_hard_concrete_starts_open_and_exactly_one_in_eval(n, beta):
    gate = HardConcreteGate(n, beta=beta)
    gate.eval()
    assert torch.equal(gate(), torch.ones(n))  # no unit zeroed by the expected-zeros rule
    assert 1 - gate.keep_probability().min().item() <= 1e-4


def test_expected_l0_formula():
    gate = HardConcreteGate(3, init_log_alpha=0.0, init_std=0.0, beta=2 / 3)
    expected = 1 / (1 + math.exp(-(0.0 - (2 / 3) * math.log(0.1 / 1.1))))
    assert gate.keep_probability()[0].item() == pytest.approx(expected, rel=1e-6)


def test_sample_statistics_match_keep_probability():
    gate = HardConcreteGate(1, init_log_alpha=0.3, init_std=0.0)
    gate.train()
    samples = torch.stack([gate() for _ in range(20000)])
    assert samples.min() >= 0 and samples.max() <= 1
    assert (samples != 0).float().mean().item() == pytest.approx(gate.keep_probability().item(), abs=0.02)


def test_deterministic_mask_zeroes_expected_number_of_smallest():
    gate = HardConcreteGate(10, init_std=0.0)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([8.0, 8, 8, 8, 8, 8, -8, -8, -8, 0.5]))
    mask = gate.deterministic_mask()
    expected_zeros = round(10 - gate.expected_l0().item())
    assert int((mask == 0).sum()) == expected_zeros == 3
    assert torch.equal(mask[:6], torch.ones(6))
    assert mask[9] > 0  # the undecided gate keeps its soft value


def test_deterministic_mask_keeps_round_expected_l0_units():
    # half-closed gates (log_alpha around -3) count in expectation, so the eval mask must keep them
    gate = HardConcreteGate(200, init_std=0.0)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.linspace(-6.0, 6.0, 200))
    kept = int((gate.deterministic_mask() != 0).sum())
    assert kept == round(gate.expected_l0().item())


def test_expected_l0_is_differentiable():
    gate = HardConcreteGate(4)
    gate.expected_l0().backward()
    assert gate.log_alpha.grad is not None and (gate.log_alpha.grad > 0).all()


def test_close_shuts_units():
    gate = HardConcreteGate(6)
    gate.close(torch.tensor([1, 4]))
    gate.eval()
    assert gate().tolist() == [1, 0, 1, 1, 0, 1]


def test_topk_keeps_top_fraction_with_straight_through_gradient():
    gate = TopKGate(8, init_threshold=0.0)  # keep half
    with torch.no_grad():
        gate.scores.copy_(torch.arange(8.0))
    gate.train()
    z = gate()
    assert z.detach().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    (z * torch.arange(8.0)).sum().backward()
    assert torch.equal(gate.scores.grad, torch.arange(8.0))
    assert gate.expected_l0().item() == pytest.approx(4.0)
