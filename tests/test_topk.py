"""Issue 5: gate="topk" -- MLPruning's learnable Top-k threshold and its adaptive regularization."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_flop import FlopConfig, TopKGate, expected_sparsity, get_flop_model, sparsity_report
from hf_flop.constraint import AdaptiveRegularizer, gate_group_overrides


@pytest.mark.parametrize("n", [1, 4, 64, 1536, 100_000])
def test_topk_gate_starts_keeping_every_unit_and_first_units_win_ties(n):
    gate = TopKGate(n)
    assert gate.kept_count() == n and gate.expected_l0().item() == pytest.approx(n)
    with torch.no_grad():
        gate.threshold.fill_(math.log(0.5 / 0.5))  # keep half
    kept = gate.deterministic_mask().nonzero().squeeze(1)
    assert kept.tolist() == list(range(math.ceil(n / 2)))  # equal scores: the first units (rank gates: largest SVs)


def test_topk_straight_through_gradients():
    gate = TopKGate(8, init_threshold=0.0)
    with torch.no_grad():
        gate.scores.copy_(torch.arange(8.0))
    gate.train()
    weights = torch.arange(1.0, 9.0)
    (gate() * weights).sum().backward()
    assert torch.equal(gate.scores.grad, weights)  # each score: its mask entry's gradient
    assert gate.threshold.grad.item() == pytest.approx(weights[4:].sum().item())  # the kept entries' sum
    gate.zero_grad()
    p = gate.keep_probability()
    assert p[0].item() == pytest.approx(4 / 8)  # the value is what the mask keeps
    p.sum().backward()
    assert gate.threshold.grad.item() == pytest.approx(8 * 0.25)  # the gradient is n * sigmoid'(threshold)


def test_adaptive_regularizer_is_one_sided_and_grows_with_distance():
    reg = AdaptiveRegularizer(min_strength=50.0, scale=500.0)
    target = 0.6  # remaining 0.4
    for sparsity in (0.6, 0.7):  # at or past the target: no pressure, no gradient
        s = torch.tensor(sparsity, requires_grad=True)
        penalty = reg(s, target)
        penalty.backward()
        assert penalty.item() == 0.0 and s.grad.item() == 0.0
    assert reg.values() == {"topk_strength": 0.0, "topk_gap": 0.0}
    near, far = reg.strength(0.01, 0.4), reg.strength(0.5, 0.4)
    assert near == 50.0 and far == pytest.approx(500.0 * (0.5 / 0.6) ** 2) and far > near
    s = torch.tensor(0.1, requires_grad=True)  # remaining 0.9, 0.5 above the target
    penalty = reg(s, target)
    penalty.backward()
    assert penalty.item() == pytest.approx(far * 0.25, rel=1e-5)
    assert s.grad.item() < 0  # raising the sparsity lowers the penalty
    assert reg.values()["topk_gap"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="min_strength"):
        AdaptiveRegularizer(min_strength=0.0)


def test_gate_group_overrides_remove_momentum():
    p = [nn.Parameter(torch.zeros(1))]
    assert gate_group_overrides(torch.optim.AdamW(p, betas=(0.9, 0.98))) == {"betas": (0.0, 0.98)}
    assert gate_group_overrides(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == {"momentum": 0.0}
    assert gate_group_overrides(torch.optim.Adagrad(p)) == {}


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.head = nn.Linear(32, 128), nn.Linear(128, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


@pytest.mark.parametrize("target", [0.4, 0.6])
def test_topk_gates_reach_the_target_on_a_tiny_task(target):
    """A linear-teacher classification task; block-level Top-k gates pruned by the adaptive regularizer."""
    torch.manual_seed(0)
    config = FlopConfig(levels=["block"], gate="topk", block_size=4, target_modules=["up", "down"])
    model = get_flop_model(_MLP(), config)
    gates = model.base_model.gate_parameters()
    gate_ids = {id(p) for p in gates}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids], lr=1e-2)
    optimizer.add_param_group({"params": gates, "lr": 0.05, "weight_decay": 0.0, **gate_group_overrides(optimizer)})
    reg = AdaptiveRegularizer()
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(32, 4, generator=g)
    steps, warmup = 250, 100
    model.train()
    for step in range(steps):
        x = torch.randn(64, 32, generator=g)
        loss = F.cross_entropy(model(x), (x @ teacher).argmax(1))
        loss = loss + reg(expected_sparsity(model), target * min(1.0, step / warmup))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    report = sparsity_report(model)
    assert abs(report.deterministic_sparsity - target) <= 0.01
    assert report.expected_sparsity == pytest.approx(report.deterministic_sparsity)  # top-k: no expectation gap
