"""The collaborators PruningTrainer wires together, tested on their own (no training run)."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_flop.accounting import TargetCheck
from hf_flop.training import Distillation, PruningArguments, PruningSchedule, TargetMiss, TargetMissedWarning
from hf_flop.training.checkpoint import RUN_STATE_NAME, load_run_state
from hf_flop.training.outcome import training_facts


def test_schedule_kinds_and_steps():
    one_shot = PruningSchedule(0.0, 0.5, 0.6, max_steps=10)
    assert (one_shot.kind, one_shot.has_recovery, one_shot.pruning_steps) == ("one-shot", True, 0)
    assert one_shot.target_at(0) == one_shot.target_at(7) == 0.6  # no pruning steps to warm up over
    assert one_shot.phase_at(0) == "pruning" and one_shot.phase_at(1) == "recovery"

    two = PruningSchedule(0.7, 0.5, 0.6, max_steps=10)
    # 0.7 * 10 is 7.000000000000001 in floats: still 7 steps, not 8
    assert (two.kind, two.pruning_steps, two.warmup_steps) == ("two-phase", 7, 4)
    assert two.target_at(2) == pytest.approx(0.3) and two.target_at(4) == 0.6
    assert [two.phase_at(s) for s in (7, 8)] == ["pruning", "recovery"]
    assert [two.boundary_due(s) for s in (6, 7, 9)] == [False, True, True]

    learned = PruningSchedule(1.0, 3, 0.5, max_steps=10)
    assert (learned.kind, learned.has_recovery, learned.pruning_steps, learned.warmup_steps) == (
        "learned",
        False,
        10,
        3,
    )
    assert not learned.boundary_due(10)
    assert PruningSchedule(0.5, 0.5, 0.5).pruning_steps == 0  # before Trainer knows the run's length


def _check(sparsity: float, expected: float) -> TargetCheck:
    return TargetCheck(sparsity=sparsity, expected=expected, target=0.5, tolerance=0.01)


def test_target_miss_kinds_and_names(tmp_path):
    args = PruningArguments(output_dir=str(tmp_path), gate_learning_rate=0.3, report_to=[])
    schedule = PruningSchedule(1.0, 0.5, 0.5, max_steps=20)
    assert TargetMiss.of(_check(0.4, 0.45), schedule, args).kind == "not_closed"
    assert TargetMiss.of(_check(0.6, 0.6), schedule, args).kind == "closed_too_far"
    undecided = TargetMiss.of(_check(0.55, 0.505), schedule, args)
    assert (undecided.kind, undecided.steps_at_target) == ("undecided", 10)
    miss = TargetMiss.of(_check(0.4, 0.45), schedule, args)
    plain = miss.message()
    assert (
        plain.startswith("PruningTrainer: the model ended at sparsity 0.400")
        and "gate_learning_rate (now 0.3)" in plain
    )
    cli = miss.message({"gate_learning_rate": "--gate-lr"}, prefix="")
    assert cli.startswith("the model ended") and "--gate-lr (now 0.3)" in cli and "gate_learning_rate" not in cli
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(TargetMissedWarning(miss), stacklevel=1)
    assert caught[0].category is TargetMissedWarning and caught[0].message.miss is miss
    assert str(caught[0].message) == plain and issubclass(TargetMissedWarning, UserWarning)


def test_distillation_loss_mixes_task_kl_and_hidden_mse():
    torch.manual_seed(0)
    student_logits, teacher_logits = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    hidden = lambda: tuple(torch.randn(2, 5, 4) for _ in range(3))  # noqa: E731
    student = {"logits": student_logits, "hidden_states": hidden()}
    teacher = {"logits": teacher_logits, "hidden_states": hidden()}
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    task = torch.tensor(1.5)
    distillation = Distillation(torch.nn.Identity(), alpha=0.25, temperature=2.0, hidden_weight=0.5)
    loss, hidden_term = distillation.loss(task, student, teacher, mask)

    kl = (teacher_logits / 2).softmax(-1) * (
        (teacher_logits / 2).log_softmax(-1) - (student_logits / 2).log_softmax(-1)
    )
    kl = (kl.sum(-1) * 4 * mask).sum() / mask.sum()
    mse = torch.stack(
        [
            (((s - t) ** 2).mean(-1) * mask).sum() / mask.sum()
            for s, t in zip(student["hidden_states"][1:], teacher["hidden_states"][1:])
        ]
    ).mean()
    assert hidden_term.item() == pytest.approx(mse.item(), rel=1e-5)
    assert loss.item() == pytest.approx((0.75 * 1.5 + 0.25 * kl + 0.5 * mse).item(), rel=1e-5)
    half, _ = distillation.loss(task, student, teacher, mask, window=0.5)  # accumulation scales the terms only
    assert half.item() == pytest.approx((0.75 * 1.5 + 0.125 * kl + 0.25 * mse).item(), rel=1e-5)
    assert distillation.student_inputs({"input_ids": 1}) == {"input_ids": 1, "output_hidden_states": True}
    with pytest.raises(ValueError, match="teacher must share the task head"):
        distillation.logit_loss(student_logits, teacher_logits[..., :3], mask)


def test_run_state_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=f"has no {RUN_STATE_NAME}: it was not written by PruningTrainer"):
        load_run_state(str(tmp_path))


def test_training_facts_name_the_schedule():
    class Trainer:  # the attributes training_facts reads
        args = PruningArguments(output_dir="unused", pruning_phase=0.0, oneshot_score="obs", report_to=[])
        flop_config = type("Config", (), {"target_sparsity": 0.5, "levels": ["head", "row"], "gate": "hard_concrete"})
        schedule = PruningSchedule(0.0, 0.5, 0.5, max_steps=12)
        state = type("State", (), {"global_step": 12})
        distillation, compacted_recovery, calibration_data, uniform_fix, target_check = None, True, [], None, None
        oneshot_score = "obs"

    facts = training_facts(Trainer())
    assert facts["schedule"].startswith("one-shot: masks set at the target by obs scores")
    assert facts["schedule"].endswith("12 recovery steps on the compacted model")
    assert facts["distillation"] == "none" and "levels head, row" in facts["pruning"]
