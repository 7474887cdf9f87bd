"""Issue 3: PruningTrainer -- the Lagrangian constraint, schedules, logs, resume, distillation, errors."""

from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

import hf_flop
from hf_flop import FlopConfig, PruningArguments, PruningTrainer, get_flop_model, sparsity_report
from hf_flop.constraint import AdaptiveRegularizer, LagrangianConstraint, resolve_warmup_steps, warmed_up_target

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_task import VOCAB, CountingTask, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flop_llama(target: float = 0.5, levels=("rank",), seed: int = 0, **config):
    return get_flop_model(tiny_llama(seed), FlopConfig(target_sparsity=target, levels=list(levels), **config))


def make_trainer(
    out, model=None, *, steps: int = 20, seed: int = 0, teacher_model=None, reconstruction_data=None, **overrides
):
    settings = dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=seed,
        disable_tqdm=True,
        use_cpu=True,
        pruning_phase=1.0,  # these tests are about the learned schedule (the default is one-shot + recovery)
    )
    settings.update(overrides)
    model = flop_llama(seed=seed) if model is None else model
    return PruningTrainer(
        model=model,
        args=PruningArguments(**settings),
        train_dataset=CountingTask(),
        teacher_model=teacher_model,
        reconstruction_data=reconstruction_data,
    )


# --- the constraint and the schedule -----------------------------------------------------------------


def test_lagrangian_term_and_warmup_schedule():
    constraint = LagrangianConstraint()
    constraint.load_values({"lambda_1": -2.0, "lambda_2": 3.0})
    s = torch.tensor(0.3, requires_grad=True)
    penalty = constraint(s, 0.5)
    assert penalty.item() == pytest.approx(-2.0 * -0.2 + 3.0 * 0.04)
    penalty.backward()
    assert s.grad.item() == pytest.approx(-2.0 + 2 * 3.0 * -0.2)
    assert constraint.lambda_1.grad.item() == pytest.approx(-0.2)  # ascent on this lowers lambda_1
    assert constraint.lambda_2.grad.item() == pytest.approx(0.04)
    assert [warmed_up_target(0.8, step, 10) for step in (0, 5, 10, 50)] == pytest.approx([0.0, 0.4, 0.8, 0.8])
    assert warmed_up_target(0.8, 0, 0) == 0.8
    assert resolve_warmup_steps(0.25, 200) == 50 and resolve_warmup_steps(30, 200) == 30
    with pytest.raises(ValueError, match="lambda_2"):
        constraint.load_values({"lambda_1": 1.0})


# --- reaching the target -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_training_reaches_the_target_sparsity(tmp_path, target):
    """300 steps with the default schedule (warm-up over half the run) end at the target, eval masks included."""
    trainer = make_trainer(tmp_path, flop_llama(target), steps=300, logging_steps=50)
    trainer.train()
    report = sparsity_report(trainer.model)
    assert abs(report.deterministic_sparsity - target) <= 0.01, str(report)
    assert abs(report.expected_sparsity - target) <= 0.01
    task_losses = [h["task_loss"] for h in trainer.state.log_history if "task_loss" in h]
    assert task_losses[-1] < 0.6 * task_losses[0]  # the task is learned while pruning (log 64 = 4.16 at start)


def _target_warnings(trainer) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "PruningTrainer" in str(w.message)]


def test_a_missed_target_is_not_silent(tmp_path, caplog):
    """10 steps cannot take the model to 0.5: train() warns (and logs) by how much and what to change."""
    trainer = make_trainer(tmp_path, flop_llama(0.5), steps=10)
    with caplog.at_level("WARNING", logger="hf_flop.trainer"):
        messages = _target_warnings(trainer)
    assert len(messages) == 1, messages
    check = trainer.target_check
    assert not check.met and check.target == 0.5 and check.gap < -0.4 and check.tolerance == 0.01
    text = messages[0]
    assert f"ended at sparsity {check.sparsity:.3f}" in text and "for a target of 0.500" in text
    assert f"{abs(check.gap):.3f} short of it" in text
    assert "Train longer (max_steps / num_train_epochs)" in text and "gate_learning_rate (now 0.2)" in text
    assert "(5 at the full target after the warm-up of 5)" in text
    assert [r.getMessage() for r in caplog.records if r.name == "hf_flop.trainer"] == [text]


def test_a_met_target_gives_no_warning(tmp_path):
    trainer = make_trainer(tmp_path, flop_llama(0.3), steps=60)
    assert _target_warnings(trainer) == []
    assert trainer.target_check.met and abs(trainer.target_check.gap) <= 0.01


def test_target_tolerance_is_half_the_largest_unit_when_that_is_larger():
    """A head of the tiny Llama is a large share of its prunable weights: on target within half of it."""
    from hf_flop.accounting import TARGET_TOLERANCE, check_target, largest_unit_params

    rank_only = flop_llama(0.3)
    assert check_target(rank_only).tolerance == TARGET_TOLERANCE
    grouped = flop_llama(0.3, levels=("rank", "head", "row"))
    prunable = sparsity_report(grouped).prunable_params
    assert check_target(grouped).tolerance == pytest.approx(largest_unit_params(grouped) / prunable / 2)
    assert check_target(grouped).tolerance > TARGET_TOLERANCE


# --- logs, optimizer groups, gradient accumulation ----------------------------------------------------


def test_logs_and_optimizer_groups(tmp_path):
    trainer = make_trainer(tmp_path, steps=20, logging_steps=5, target_warmup_steps=10, weight_decay=0.1)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [5, 10, 15, 20]
    for h in logs:
        for key in (
            "expected_sparsity",
            "deterministic_sparsity",
            "target_sparsity",
            "lambda_1",
            "lambda_2",
            "task_loss",
        ):
            assert isinstance(h[key], float), key
    assert [h["target_sparsity"] for h in logs] == pytest.approx([0.25, 0.5, 0.5, 0.5])  # warm-up over 10 steps
    assert logs[-1]["lambda_1"] == trainer.constraint.lambda_1.item() < 0  # pushed to prune more
    assert logs[-1]["lambda_2"] == trainer.constraint.lambda_2.item() > 0
    assert logs[-1]["expected_sparsity"] == pytest.approx(sparsity_report(trainer.model).expected_sparsity)

    groups = {g.get("flop_role", "model"): g for g in trainer.optimizer.param_groups if g["params"]}
    gate_ids = {id(p) for p in trainer._flop.gate_parameters()}
    assert {id(p) for p in groups["gates"]["params"]} == gate_ids
    assert groups["gates"]["weight_decay"] == 0.0 and groups["gates"]["betas"][0] == 0.0  # no momentum
    for name in ("lambda_1", "lambda_2"):
        assert groups[name]["maximize"] and groups[name]["weight_decay"] == 0.0
        assert groups[name]["params"][0] is getattr(trainer.constraint, name)
    # the linear schedule has decayed the model's learning rate; gates and multipliers keep theirs
    assert groups["model"]["lr"] < 1e-4
    assert groups["gates"]["lr"] == trainer.args.gate_learning_rate
    assert groups["lambda_1"]["lr"] == trainer.args.lagrangian_learning_rate
    assert groups["lambda_2"]["lr"] == trainer.args.quadratic_learning_rate
    model_params = {id(p) for p in trainer.model.parameters()}
    assert id(trainer.constraint.lambda_1) not in model_params  # hence outside gradient clipping


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("loss_scaled_by_model", [True, False])
def test_one_step_of_multiplier_ascent_matches_the_gap(tmp_path, accumulation, loss_scaled_by_model):
    """Plain SGD, one optimizer step at the full target: lambda_1 moves by lr * (s - t), lambda_2 by lr * (s - t)^2,
    whatever the accumulation and however Trainer normalises the task loss; a tiny max_grad_norm clips the model's
    gradients but not the multipliers'."""
    trainer = make_trainer(
        tmp_path,
        steps=1,
        optim="sgd",
        per_device_train_batch_size=16 // accumulation,
        gradient_accumulation_steps=accumulation,
        target_warmup_steps=0,
        max_grad_norm=1e-6,
        lagrangian_learning_rate=0.5,
        quadratic_learning_rate=0.25,
    )
    trainer.model_accepts_loss_kwargs = loss_scaled_by_model  # Llama's loss honours num_items_in_batch
    gap = sparsity_report(trainer.model).expected_sparsity - 0.5  # the gates start dense: s = 0
    trainer.train()
    assert trainer.constraint.lambda_1.item() == pytest.approx(0.5 * gap, rel=1e-5)
    assert trainer.constraint.lambda_2.item() == pytest.approx(0.25 * gap**2, rel=1e-5)


def test_accumulation_gives_the_same_task_loss_log(tmp_path):
    """task_loss is logged in the units of Trainer's loss: one full batch or two half batches agree."""
    losses = []
    for accumulation in (1, 2):
        trainer = make_trainer(
            tmp_path / str(accumulation),
            steps=1,
            logging_steps=1,
            per_device_train_batch_size=16 // accumulation,
            gradient_accumulation_steps=accumulation,
        )
        trainer.train()
        losses.append(trainer.state.log_history[0]["task_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=0.05)  # different gate samples, same scale


def test_topk_gates_get_the_adaptive_regularizer(tmp_path):
    """gate="topk" has no expectation to hold: MLPruning's one-sided regularizer replaces the multipliers."""
    trainer = make_trainer(tmp_path, flop_llama(0.5, gate="topk"), steps=20, logging_steps=10, target_warmup_steps=5)
    assert isinstance(trainer.constraint, AdaptiveRegularizer)
    trainer.train()
    roles = [g.get("flop_role") for g in trainer.optimizer.param_groups]
    assert roles.count("gates") == 1 and "lambda_1" not in roles
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["topk_strength"] > 0 and last["expected_sparsity"] > 0


# --- checkpoints -------------------------------------------------------------------------------------


def _run(out, resume=None):
    trainer = make_trainer(
        out,
        flop_llama(0.5, levels=("rank", "head", "row")),
        steps=30,
        save_strategy="steps",
        save_steps=15,
        target_warmup_steps=10,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Interrupted at step 15 and resumed: the same gates, masks, multipliers and weights at step 30.

    Tolerance: 1e-6 absolute (on CPU the two runs are in fact bitwise equal).
    """
    full = _run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-15"
    state = json.loads((checkpoint / "flop_constraint.json").read_text())
    assert state["global_step"] == 15 and state["lambda_1"] < 0
    resumed = _run(tmp_path / "resumed", resume=str(checkpoint))
    assert resumed.state.global_step == 30
    for name, gate in full._flop.gates().items():
        other = resumed._flop.gates()[name]
        assert torch.equal(gate.deterministic_mask(), other.deterministic_mask()), name
        for a, b in zip(gate.parameters(), other.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for key in ("lambda_1", "lambda_2"):
        assert resumed.constraint.values()[key] == pytest.approx(full.constraint.values()[key], abs=1e-6)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_resume_from_a_checkpoint_without_multipliers_fails_clearly(tmp_path):
    full = _run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-15"
    (checkpoint / "flop_constraint.json").unlink()
    with pytest.raises(ValueError, match="flop_constraint.json"):
        make_trainer(tmp_path / "again", full.model, steps=30).train(resume_from_checkpoint=str(checkpoint))


# --- distillation ------------------------------------------------------------------------------------


class _FixedTeacher(nn.Module):
    """A teacher with no hidden states, no config, no loss: logits that always favour one token."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(VOCAB))
        with torch.no_grad():
            self.bias[token] = 8.0

    def forward(self, input_ids, **kwargs):
        return self.bias.expand(*input_ids.shape, VOCAB)


def test_distillation_pulls_the_student_to_a_logits_only_teacher(tmp_path):
    teacher = _FixedTeacher(token=7)
    trainer = make_trainer(tmp_path, steps=40, teacher_model=teacher, distillation_alpha=1.0, learning_rate=1e-2)
    assert not teacher.training and not teacher.bias.requires_grad
    trainer.train()
    ids = CountingTask(n=32, seed=1).ids
    model = trainer.model.eval()
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)
    assert (predicted == 7).float().mean() > 0.9  # the task labels say otherwise: only the teacher wants 7
    assert teacher.bias.grad is None


def test_distillation_from_the_dense_model(tmp_path):
    """The usual set-up: the dense model, copied before injection, teaches the pruned one."""
    dense = tiny_llama(0)
    teacher = copy.deepcopy(dense)
    model = get_flop_model(dense, FlopConfig(target_sparsity=0.5))
    trainer = make_trainer(tmp_path, model, steps=5, logging_steps=5, teacher_model=teacher)
    trainer.train()
    assert "task_loss" in trainer.state.log_history[0]
    with pytest.raises(ValueError, match="shares parameters"):
        make_trainer(tmp_path, model, teacher_model=model.base_model.model)


# --- bad input ---------------------------------------------------------------------------------------


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no FLOP layers"):
        make_trainer(tmp_path, tiny_llama(0))
    # rows only: attention projections have no gate, so at most 1/3 of the prunable weights can go
    with pytest.raises(ValueError, match="cannot be reached"):
        make_trainer(tmp_path, flop_llama(0.8, levels=("row",)))
    make_trainer(tmp_path, flop_llama(0.6, levels=("row",)))  # 0.6 is reachable
    with pytest.raises(TypeError, match="PruningArguments"):
        PruningTrainer(model=flop_llama(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    with pytest.raises(ValueError, match="gate_learning_rate"):
        PruningArguments(output_dir=str(tmp_path), gate_learning_rate=0.0)
    with pytest.raises(ValueError, match="distillation_alpha"):
        PruningArguments(output_dir=str(tmp_path), distillation_alpha=1.5)
    with pytest.raises(ValueError, match="target_warmup_steps"):
        PruningArguments(output_dir=str(tmp_path), target_warmup_steps=-1)


# --- export ------------------------------------------------------------------------------------------


def test_save_compacted(tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path / "run", flop_llama(0.5, levels=("rank", "head", "row")), steps=30)
    trainer.train()
    out = trainer.save_compacted(tmp_path / "small")
    small = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = CountingTask(n=4, seed=2).ids
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(small(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in tiny_llama(0).parameters())
    assert hf_flop.PruningTrainer is PruningTrainer
