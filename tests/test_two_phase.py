"""Issue 13: fixing the masks at the target, the two-phase schedule (prune, fix, recover), hidden-state distillation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_trainer import _FixedTeacher, flop_llama, make_trainer
from tiny_task import CountingTask, tiny_llama
from transformers import TrainerCallback

from hf_flop import (
    FlopConfig,
    PruningArguments,
    compute_scores,
    get_flop_model,
    prune_oneshot,
    sparsity_report,
    warm_start_gates,
)
from hf_flop.accounting import largest_unit_params
from hf_flop.oneshot import fix_masks_at_target, gate_order_scores, prune_to_target

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _masks(model) -> dict[str, torch.Tensor]:
    return {k: g.deterministic_mask().detach().clone() for k, g in model.base_model.gates().items()}


def _half_unit(model) -> float:
    """Half the largest unit, as a fraction of the prunable parameters: how close a fixed size can get."""
    return largest_unit_params(model) / sparsity_report(model).prunable_params / 2


def _randomised_gates(levels, seed: int = 1):
    model = flop_llama(0.5, levels=levels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.base_model.gates().values():
            gate.log_alpha.copy_(torch.randn(gate.n, generator=g) * 3)
    return model


def _calibration() -> list[dict[str, torch.Tensor]]:
    """Four batches of 8 sequences of the tiny task: 384 tokens to fit (the widest refit layer reads 96)."""
    return [{"input_ids": CountingTask(n=8, seed=20 + i).ids} for i in range(4)]


# --- fixing the masks at the target ------------------------------------------------------------------


@pytest.mark.parametrize("levels", [("rank",), ("head", "row"), ("rank", "head", "row")])
def test_fixing_the_masks_hits_the_target_within_half_a_unit(levels):
    model = _randomised_gates(levels)
    result = fix_masks_at_target(model)
    report = sparsity_report(model)
    assert abs(report.deterministic_sparsity - 0.5) <= _half_unit(model)
    assert abs(result.kept_params - result.budget) <= result.step / 2
    for gate in model.base_model.gates().values():  # set_mask: every eval value exactly 0 or 1
        assert set(gate.deterministic_mask().unique().tolist()) <= {0.0, 1.0}


def test_fixing_the_masks_keeps_the_trained_decisions_and_changes_only_the_edge():
    """At the eval masks' own size the masks are reproduced; sparser, every dropped unit stays dropped and the
    least firmly kept units (lowest log_alpha) close first. Heads and rows only: no rank component is reopened
    for compacting to a dense matrix."""
    model = _randomised_gates(("head", "row"))
    before = _masks(model)
    strength = {k: g.log_alpha.detach().clone() for k, g in model.base_model.gates().items()}
    own = sparsity_report(model).deterministic_sparsity
    fix_masks_at_target(model, own)
    assert all(torch.equal(before[k] != 0, m != 0) for k, m in _masks(model).items())

    model = _randomised_gates(("head", "row"))
    fix_masks_at_target(model, min(own + 0.2, 0.9))
    after = _masks(model)
    newly_closed = []
    for key, mask in after.items():
        assert not ((before[key] == 0) & (mask != 0)).any(), key  # nothing dropped was reopened
        newly_closed += strength[key][(before[key] != 0) & (mask == 0)].tolist()
    kept_strengths = torch.cat([strength[k][after[k] != 0] for k in after])
    assert newly_closed and max(newly_closed) <= kept_strengths.min().item()


def test_gate_order_scores_rank_kept_units_above_dropped_ones():
    model = _randomised_gates(("rank", "head", "row"))
    scores, masks = gate_order_scores(model), _masks(model)
    kept = torch.cat([scores[k][masks[k] != 0] for k in masks])
    dropped = torch.cat([scores[k][masks[k] == 0] for k in masks])
    assert len(dropped) and dropped.max() < kept.min()
    assert sorted(torch.cat(list(scores.values())).tolist()) == list(range(len(kept) + len(dropped)))
    with pytest.raises(ValueError, match="ranking"):
        prune_to_target(model, scores, ranking="raw")


# --- the two-phase schedule ------------------------------------------------------------------------


class _Capture(TrainerCallback):
    """The eval masks and gate parameters right after a given step (after the trainer's own callback)."""

    def __init__(self, trainer, step: int) -> None:
        self.trainer, self.step, self.masks, self.gates, self.weights = trainer, step, None, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:  # the gated model: with compact_recovery, trainer.model is compacted
            self.masks = _masks(self.trainer.gated_model)
            self.gates = [p.detach().clone() for p in self.trainer._flop.gate_parameters()]
            self.weights = [p.detach().clone() for n, p in self.trainer.gated_model.named_parameters() if "flop_P" in n]


@pytest.mark.parametrize("gate", ["hard_concrete", "topk"])
def test_two_phase_run_ends_exactly_at_the_target_with_the_masks_held(tmp_path, gate):
    trainer = make_trainer(  # no calibration data: no scoring or refit forwards among the recorded ones
        tmp_path,
        flop_llama(0.5, levels=("rank", "head", "row"), gate=gate),
        steps=60,
        pruning_phase=0.5,
        calibration_batches=0,
    )
    assert trainer.pruning_steps() == 0  # before train() the run has no length yet
    capture = _Capture(trainer, 30)
    trainer.add_callback(capture)
    sampled = []  # (step being computed, whether the gate sampled): recovery steps use the fixed eval masks
    head_gate = next(g for k, g in trainer._flop.gates().items() if k.startswith("head_"))
    head_gate.register_forward_hook(
        lambda module, args, out: sampled.append((trainer.state.global_step, module.training))
    )
    trainer.train()
    assert trainer.pruning_steps() == 30 and trainer.recovering
    assert all(training == (step < 30) for step, training in sampled) and len(sampled) >= 60

    # on the target, within half the largest unit, and the final check agrees
    report = sparsity_report(trainer.model)
    assert abs(report.deterministic_sparsity - 0.5) <= _half_unit(trainer.model)
    assert trainer.target_check.met
    # the masks and gates did not move in the recovery phase; the weights did (it fine-tuned)
    assert capture.masks is not None
    for key, mask in _masks(trainer.model).items():
        assert torch.equal(mask, capture.masks[key]), key
    for before, after in zip(capture.gates, trainer._flop.gate_parameters()):
        assert torch.equal(before, after) and not after.requires_grad
    after_weights = [p for n, p in trainer.model.named_parameters() if "flop_P" in n]
    assert any(not torch.equal(a, b) for a, b in zip(capture.weights, after_weights))
    groups = {g.get("flop_role"): g for g in trainer.optimizer.param_groups}
    assert groups["gates"]["lr"] == 0.0

    # the logs: the boundary, the phase of every training log, task loss and total
    boundary = [h for h in trainer.state.log_history if "boundary_step" in h]
    assert len(boundary) == 1 and boundary[0]["boundary_step"] == 30 and trainer.boundary["boundary_step"] == 30
    assert boundary[0]["boundary_deterministic_sparsity_after"] == pytest.approx(report.deterministic_sparsity)
    assert "boundary_deterministic_sparsity_before" in boundary[0]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [10, 20, 30, 40, 50, 60]  # the boundary entry did not cancel step 30's
    assert [h["phase"] for h in logs] == ["pruning"] * 3 + ["recovery"] * 3
    for h in logs:
        assert isinstance(h["task_loss"], float)
    for h in logs[3:]:  # the constraint term left the loss: the total is the task loss
        assert h["loss"] == pytest.approx(h["task_loss"], rel=1e-5)
    if gate == "hard_concrete":  # the warm-up is measured within the pruning phase (half of 30 steps)
        assert logs[0]["target_sparsity"] == pytest.approx(0.5 * 10 / 15)
        assert logs[0]["loss"] != pytest.approx(logs[0]["task_loss"], rel=1e-3)
    assert "two phases: 30 pruning steps" in trainer.training_facts()["schedule"]


def test_the_boundary_refits_the_kept_weights_with_reconstruction_data(tmp_path):
    trainer = make_trainer(
        tmp_path,
        flop_llama(0.5, levels=("rank", "head", "row")),
        steps=20,
        pruning_phase=0.5,
        logging_steps=5,
        reconstruction_data=_calibration(),
    )
    capture = _Capture(trainer, 10)
    trainer.add_callback(capture)
    trainer.train()
    assert trainer.boundary["boundary_reconstructed_modules"] > 0
    assert abs(sparsity_report(trainer.model).deterministic_sparsity - 0.5) <= _half_unit(trainer.model)
    assert all(torch.equal(m, capture.masks[k]) for k, m in _masks(trainer.model).items())
    assert "refit on calibration data" in trainer.training_facts()["schedule"]


@pytest.mark.filterwarnings("ignore:PruningTrainer. the model ended")  # 10 steps do not reach the target
def test_pruning_phase_one_keeps_the_single_phase_run(tmp_path):
    trainer = make_trainer(tmp_path, steps=10, logging_steps=5, save_strategy="steps", save_steps=10)
    trainer.train()
    assert trainer.args.pruning_phase == 1.0 and not trainer.args.two_phase and not trainer.recovering
    assert trainer.pruning_steps() == 10 and trainer.boundary is None
    assert all("phase" not in h and "boundary_step" not in h for h in trainer.state.log_history)
    state = json.loads((tmp_path / "checkpoint-10" / "flop_constraint.json").read_text())
    assert set(state) == {"lambda_1", "lambda_2", "global_step", "target"}
    assert all(p.requires_grad for p in trainer._flop.gate_parameters())


def test_pruning_steps_round_up_without_float_noise(tmp_path):
    trainer = make_trainer(tmp_path, steps=10, pruning_phase=0.7)
    trainer.state.max_steps = 10
    assert trainer.pruning_steps() == 7  # 0.7 * 10 is 7.000000000000001 in floats
    trainer.state.max_steps = 9
    assert trainer.pruning_steps() == 7  # ceil(6.3)
    trainer.args.pruning_phase = 0.01
    assert trainer.pruning_steps() == 1


# --- one-shot masks (pruning_phase=0) and warm-started gates ------------------------------------------


def test_pruning_phase_zero_sets_the_masks_one_shot_before_the_first_step(tmp_path):
    """The masks are prune_oneshot's (same score, same data) from step 0 on, exactly at the target; the
    refit ran; every step recovers with the masks held."""
    model = flop_llama(0.5, levels=("head", "row"))
    untrained = copy.deepcopy(model)
    trainer = make_trainer(
        tmp_path, model, steps=20, pruning_phase=0.0, logging_steps=5, reconstruction_data=_calibration()
    )
    assert trainer.args.oneshot_score == "auto" and trainer.oneshot_score == "obs"  # the default, resolved
    reference = prune_oneshot(untrained, None, _calibration(), trainer.oneshot_score, reconstruct=False)
    capture = _Capture(trainer, 1)
    trainer.add_callback(capture)
    trainer.train()
    assert trainer.pruning_steps() == 0 and trainer.recovering and trainer.target_check.met
    assert trainer.boundary["boundary_step"] == 0 and trainer.boundary["boundary_reconstructed_modules"] > 0
    expected = _masks(reference)
    for key, mask in _masks(trainer.model).items():
        assert torch.equal(mask, expected[key]) and torch.equal(mask, capture.masks[key]), key
    assert abs(sparsity_report(trainer.model).deterministic_sparsity - 0.5) <= _half_unit(trainer.model)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["phase"] for h in logs] == ["recovery"] * 4
    assert all(h["loss"] == pytest.approx(h["task_loss"], rel=1e-5) for h in logs)  # no constraint term
    assert trainer.training_facts()["schedule"].startswith("one-shot: masks set at the target by obs scores")


def test_without_reconstruction_data_the_calibration_is_a_seeded_sample_of_the_training_data(tmp_path):
    trainer = make_trainer(tmp_path, flop_llama(0.5, levels=("head", "row")), pruning_phase=0.0, calibration_batches=3)
    data = trainer.reconstruction_data
    assert len(data) == 3 and all(b["input_ids"].shape[0] == 16 for b in data)
    again = make_trainer(tmp_path, flop_llama(0.5, levels=("head", "row")), pruning_phase=0.0, calibration_batches=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(data, again.reconstruction_data))
    rows = {tuple(r.tolist()) for b in data for r in b["input_ids"]}
    assert len(rows) > 16  # drawn from across the dataset, not one batch repeated
    one_phase = make_trainer(tmp_path, flop_llama(0.5), calibration_batches=3)
    assert one_phase.reconstruction_data is None  # nothing to score or refit in a single-phase run


def test_pruning_phase_zero_resumes_without_choosing_the_masks_again(tmp_path):
    def run(out, resume=None):
        trainer = make_trainer(
            out,
            flop_llama(0.5, levels=("head", "row")),
            steps=20,
            pruning_phase=0.0,
            save_strategy="steps",
            save_steps=10,
            reconstruction_data=_calibration(),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-10"))
    assert resumed.boundary == pytest.approx(full.boundary)
    for (name, x), y in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


class _GatesAtStart(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer, self.log_alpha = trainer, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.log_alpha = {k: g.log_alpha.detach().clone() for k, g in self.trainer._flop.gates().items()}


@pytest.mark.parametrize("score", ["activation", None])
def test_a_two_phase_run_starts_its_gates_from_the_one_shot_scores(tmp_path, score):
    model = flop_llama(0.5, levels=("head", "row"))
    expected = copy.deepcopy(model)
    if score is not None:
        warm_start_gates(expected, compute_scores(expected, _calibration(), score))
    trainer = make_trainer(
        tmp_path, model, steps=4, pruning_phase=0.5, reconstruction_data=_calibration(), oneshot_score=score
    )
    start = _GatesAtStart(trainer)
    trainer.add_callback(start)
    trainer.train()
    for key, gate in expected.base_model.gates().items():
        torch.testing.assert_close(start.log_alpha[key], gate.log_alpha.detach(), msg=key)
    if score is not None:  # the scores order the units: not all gates start equal
        assert any(g.log_alpha.std() > 0.1 for g in expected.base_model.gates().values())


# --- checkpoints on both sides of the boundary ---------------------------------------------------------


def _two_phase_run(out, resume=None):
    trainer = make_trainer(
        out,
        flop_llama(0.5, levels=("rank", "head", "row")),
        steps=40,
        save_strategy="steps",
        save_steps=10,
        target_warmup_steps=10,
        pruning_phase=0.5,
        reconstruction_data=_calibration(),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _assert_same_end(a, b) -> None:
    assert b.state.global_step == a.state.global_step == 40 and b.recovering
    for name, gate in a._flop.gates().items():
        other = b._flop.gates()[name]
        assert torch.equal(gate.deterministic_mask(), other.deterministic_mask()), name
        for x, y in zip(gate.parameters(), other.parameters()):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    for (name, x), y in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)
    for key in a.constraint.values():
        assert b.constraint.values()[key] == pytest.approx(a.constraint.values()[key], abs=1e-6)
    assert b.boundary == pytest.approx(a.boundary)


def test_resume_on_either_side_of_the_boundary_equals_the_uninterrupted_run(tmp_path):
    """Checkpoints at 10 (pruning), 20 (the boundary step, saved after the fix) and 30 (recovery); resumed
    from 10 the run fixes the masks (and refits) at step 20 itself, resumed from 30 it only re-freezes the
    checkpointed gates. Both end as the uninterrupted run (tolerance 1e-6, as test_trainer's resume test)."""
    full = _two_phase_run(tmp_path / "full")
    states = {
        step: json.loads((tmp_path / "full" / f"checkpoint-{step}" / "flop_constraint.json").read_text())
        for step in (10, 20, 30)
    }
    assert [states[s]["phase"] for s in (10, 20, 30)] == ["pruning", "recovery", "recovery"]
    assert states[10]["boundary"] is None and states[30]["boundary"]["boundary_step"] == 20

    before = _two_phase_run(tmp_path / "from10", resume=str(tmp_path / "full" / "checkpoint-10"))
    _assert_same_end(full, before)
    assert before.boundary["boundary_reconstructed_modules"] > 0  # it crossed the boundary itself

    after = _two_phase_run(tmp_path / "from30", resume=str(tmp_path / "full" / "checkpoint-30"))
    _assert_same_end(full, after)
    assert [h for h in after.state.log_history if "boundary_step" in h] == [
        h for h in full.state.log_history if "boundary_step" in h
    ]
    assert {g.get("flop_role"): g["lr"] for g in after.optimizer.param_groups}["gates"] == 0.0


def test_a_recovery_checkpoint_needs_a_two_phase_run(tmp_path):
    full = make_trainer(tmp_path / "full", steps=10, pruning_phase=0.5, save_strategy="steps", save_steps=10)
    full.train()
    again = make_trainer(tmp_path / "again", steps=10)
    with pytest.raises(ValueError, match="recovery phase"):
        again.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))


# --- hidden-state distillation -----------------------------------------------------------------------


def _batch(n: int = 4):
    ids = CountingTask(n=n, seed=3).ids
    return {"input_ids": ids, "labels": ids}


def _seeded_loss(trainer, model, inputs) -> torch.Tensor:
    model.train()
    torch.manual_seed(5)  # the same gate samples in every call
    return trainer.compute_loss(model, inputs)


def test_hidden_distillation_adds_the_mean_layer_mse(tmp_path):
    teacher = tiny_llama(1)  # another random model: the hidden states differ
    model = flop_llama(0.5)
    weighted = make_trainer(tmp_path, model, teacher_model=teacher, hidden_distillation_weight=0.5)
    plain = make_trainer(tmp_path, model, teacher_model=teacher)
    inputs = _batch()
    difference = _seeded_loss(weighted, model, inputs) - _seeded_loss(plain, model, inputs)

    torch.manual_seed(5)
    student = model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states
    with torch.no_grad():
        reference = teacher(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states
    expected = torch.stack([((s - t) ** 2).mean() for s, t in zip(student[1:], reference[1:])]).mean()
    assert expected > 0
    assert difference.item() == pytest.approx(0.5 * expected.item(), rel=1e-4)


def test_hidden_distillation_leaves_out_padding(tmp_path):
    teacher = tiny_llama(1)
    model = flop_llama(0.5)
    trainer = make_trainer(tmp_path, model, teacher_model=teacher, hidden_distillation_weight=1.0)
    inputs = _batch()
    mask = torch.ones_like(inputs["input_ids"])
    mask[:, 8:] = 0
    torch.manual_seed(5)
    student = model(input_ids=inputs["input_ids"], attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        reference = teacher(input_ids=inputs["input_ids"], attention_mask=mask, output_hidden_states=True)
    value = trainer.distillation.hidden_loss(student, reference, mask)
    kept = torch.stack(
        [((s - t) ** 2)[:, :8].mean() for s, t in zip(student.hidden_states[1:], reference.hidden_states[1:])]
    ).mean()
    assert value.item() == pytest.approx(kept.item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:PruningTrainer. the model ended")  # 10 steps do not reach the target
def test_hidden_distillation_is_logged_and_zero_weight_is_off(tmp_path):
    dense = tiny_llama(0)
    teacher = copy.deepcopy(dense)
    model = get_flop_model(dense, FlopConfig(target_sparsity=0.5))
    trainer = make_trainer(
        tmp_path, model, steps=10, logging_steps=5, teacher_model=teacher, hidden_distillation_weight=1.0
    )
    trainer.train()
    logged = [h["hidden_distillation_loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(v > 0 for v in logged)  # the gates' samples move the student off the teacher
    assert "hidden-state MSE, weight 1" in trainer.training_facts()["distillation"]

    off = make_trainer(tmp_path, flop_llama(0.5), steps=5, logging_steps=5, teacher_model=_FixedTeacher(3))
    off.train()  # a teacher without hidden states is fine when the weight is 0
    assert all("hidden_distillation_loss" not in h for h in off.state.log_history)


def test_hidden_distillation_errors(tmp_path):
    with pytest.raises(ValueError, match="returned no hidden_states"):
        make_trainer(tmp_path, steps=2, teacher_model=_FixedTeacher(3), hidden_distillation_weight=1.0).train()
    with pytest.raises(ValueError, match="same hidden size"):
        make_trainer(tmp_path, steps=2, teacher_model=tiny_llama(1, hidden=32), hidden_distillation_weight=1.0).train()
    with pytest.raises(ValueError, match="same number of layers"):
        make_trainer(tmp_path, steps=2, teacher_model=tiny_llama(1, layers=3), hidden_distillation_weight=1.0).train()


# --- bad arguments -----------------------------------------------------------------------------------


def test_bad_arguments(tmp_path):
    for value in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="pruning_phase"):
            PruningArguments(output_dir=str(tmp_path), pruning_phase=value)
    with pytest.raises(ValueError, match="oneshot_score='gradient' is not a score"):
        PruningArguments(output_dir=str(tmp_path), oneshot_score="gradient")
    with pytest.raises(ValueError, match="needs oneshot_score"):
        PruningArguments(output_dir=str(tmp_path), pruning_phase=0.0, oneshot_score=None)
    with pytest.raises(ValueError, match="pass reconstruction_data"):
        make_trainer(tmp_path, flop_llama(), pruning_phase=0.0, calibration_batches=0)
    for value in (-1, 2.5):
        with pytest.raises(ValueError, match="calibration_batches"):
            PruningArguments(output_dir=str(tmp_path), calibration_batches=value)
    with pytest.raises(ValueError, match="at least 2"):  # one batch of 16 rows from the training data
        make_trainer(tmp_path, flop_llama(), pruning_phase=0.0, calibration_batches=1)
    for value in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="hidden_distillation_weight"):
            PruningArguments(output_dir=str(tmp_path), hidden_distillation_weight=value)
    with pytest.raises(ValueError, match="needs a teacher_model"):
        make_trainer(tmp_path, hidden_distillation_weight=1.0)
    with pytest.raises(ValueError, match="pruning_phase below 1"):
        make_trainer(tmp_path, flop_llama(), reconstruction_data=_calibration())
    with pytest.raises(ValueError, match="at least 2"):
        make_trainer(tmp_path, flop_llama(), reconstruction_data=_calibration()[:1], pruning_phase=0.5)
    with pytest.raises(TypeError, match="iterable of batches"):
        make_trainer(
            tmp_path, flop_llama(), reconstruction_data={"input_ids": CountingTask(n=4).ids}, pruning_phase=0.5
        )
    kept = make_trainer(tmp_path, flop_llama(), reconstruction_data=iter(_calibration()), pruning_phase=0.5)
    assert isinstance(kept.reconstruction_data, list) and len(kept.reconstruction_data) == 4  # a one-off iterator
