"""``PruningArguments(pruning_phase=0, compact_recovery=True)``: the recovery steps train ``compact(model)``,
whose weights are written back into the gated model; against the masked route (``compact_recovery=False``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from hf_flop import FlopConfig, PruningArguments, PruningTrainer, compact, get_flop_model, sparsity_report
from hf_flop.compact import kept_slices

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from test_two_phase import _masks  # noqa: E402
from tiny_models import tiny_bert  # noqa: E402
from tiny_task import VOCAB, CountingTask, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Classes(Dataset):
    """Random sequences labelled by whether their first token is in the upper half of the vocabulary."""

    def __init__(self, n: int = 128, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": (self.ids[i, 0] >= VOCAB // 2).long()}


def _bert(**config):
    dense = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # both routes: the same forward
    return get_flop_model(dense, FlopConfig(target_sparsity=0.5, levels=["head", "row"], **config)), _Classes()


def _llama(**config):  # grouped-query attention: 4 query heads on 2 KV heads, no dropout
    model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=["head", "row"], **config))
    return model, CountingTask(n=128)


BUILDERS = {"bert": _bert, "llama": _llama}


def _trainer(out, model, data, *, steps: int = 8, optimizers=(None, None), **overrides) -> PruningTrainer:
    settings = dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        weight_decay=0.01,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        pruning_phase=0.0,
        calibration_batches=4,
    )
    settings.update(overrides)
    return PruningTrainer(model=model, args=PruningArguments(**settings), train_dataset=data, optimizers=optimizers)


def _inputs(data, n: int = 6) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack([data[i]["input_ids"] for i in range(n)])}


@torch.no_grad()
def _outputs(model, inputs) -> torch.Tensor:
    return model.eval()(**inputs).logits


class _Trainable(TrainerCallback):
    """What Trainer trains, as training begins: the model it hands callbacks and its trainable parameters."""

    def __init__(self, trainer) -> None:
        self.trainer, self.model, self.trainable = trainer, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.trainable = sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "arch, config",
    [("bert", {}), ("llama", {}), ("llama", {"round_to": 8})],  # round_to 8: closed units kept as padding
    ids=["bert", "llama", "llama-padding"],
)
def test_compacted_recovery_ends_as_the_masked_route(tmp_path, arch, config):
    runs = {}
    for compacted in (False, True):
        model, data = BUILDERS[arch](**config)
        trainer = _trainer(tmp_path / str(compacted), model, data, compact_recovery=compacted)
        seen = _Trainable(trainer)
        trainer.add_callback(seen)
        trainer.train()
        assert trainer.compacted_recovery is compacted
        assert trainer.model is model and trainer.model_wrapped is model  # the user's objects, trained
        runs[compacted] = model, trainer, seen, data
    (masked, masked_trainer, masked_seen, data), (model, trainer, seen, _) = runs[False], runs[True]

    # the same one-shot masks and size; Trainer trained the compacted model, with no gate group
    expected = _masks(masked)
    assert all(torch.equal(m, expected[k]) for k, m in _masks(model).items())
    assert sparsity_report(model).deterministic_sparsity == sparsity_report(masked).deterministic_sparsity
    assert trainer.boundary == masked_trainer.boundary
    small, dense_size = compact(model), sum(p.numel() for p in masked.parameters() if p.requires_grad)
    assert seen.trainable == sum(p.numel() for p in small.parameters()) < dense_size
    assert seen.model is not model and masked_seen.model is masked and masked_seen.trainable == dense_size
    assert not any(g.get("flop_role") == "gates" for g in trainer.optimizer.param_groups)
    assert trainer.training_facts()["schedule"].endswith("recovery steps on the compacted model")
    if config.get("round_to"):
        assert any(bool((scale == 0).any()) for *_, scale in kept_slices(model).values())

    # both routes end at the same compacted model; the gated model computes what its compaction does
    inputs = _inputs(data)
    reference = _outputs(compact(masked), inputs)
    assert not torch.allclose(reference, _outputs(compact(_fresh_pruned(arch, config, tmp_path)), inputs), atol=1e-3)
    torch.testing.assert_close(_outputs(small, inputs), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(_outputs(model, inputs), _outputs(small, inputs), atol=1e-5, rtol=0)
    evaluated = trainer.evaluate(data)  # Trainer's own evaluation runs the gated model
    assert evaluated["eval_loss"] == pytest.approx(masked_trainer.evaluate(data)["eval_loss"], abs=1e-4)


def _fresh_pruned(arch: str, config: dict, tmp_path):
    """The model right after the one-shot masks and refit, before any recovery step (zero steps of training)."""
    model, data = BUILDERS[arch](**config)
    trainer = _trainer(tmp_path / "untrained", model, data)
    trainer._prepare_gates()
    return model


def _resumable_run(out, resume=None) -> tuple:
    model, data = _llama()
    trainer = _trainer(out, model, data, steps=12, save_strategy="steps", save_steps=6)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_compacted_recovery_is_a_plain_trainer_on_the_one_shot_model(tmp_path):
    """With dropout on: PruningTrainer(pruning_phase=0) ends bitwise where prune_oneshot + compact + a plain
    Trainer of the same seed end. Building the compacted model inside train() initialises layers from the
    global RNG; that must not shift the seed's dropout draws (or data order) away from the plain run."""
    from transformers import Trainer, TrainingArguments

    from hf_flop import prune_oneshot

    data = _Classes()
    calibration = [{"input_ids": torch.stack([data[i]["input_ids"] for i in range(j, j + 8)])} for j in (0, 8, 16, 24)]
    config = FlopConfig(target_sparsity=0.5, levels=["head", "row"])
    gated = get_flop_model(tiny_bert(), config)  # dropout 0.1 in the hidden states and attention
    manual = compact(prune_oneshot(get_flop_model(tiny_bert(), config), None, calibration, "obs"))
    settings = dict(max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3, seed=0, use_cpu=True)
    settings.update(save_strategy="no", report_to=[], disable_tqdm=True)
    Trainer(model=manual, args=TrainingArguments(output_dir=str(tmp_path / "plain"), **settings), train_dataset=data).train()
    args = PruningArguments(output_dir=str(tmp_path / "pruned"), pruning_phase=0.0, **settings)
    trainer = PruningTrainer(model=gated, args=args, train_dataset=data, reconstruction_data=calibration)
    trainer.train()
    assert trainer.compacted_recovery
    ours = compact(gated).state_dict()
    for name, value in manual.state_dict().items():
        assert torch.equal(value, ours[name]), name


def test_resume_from_a_compacted_checkpoint_equals_the_uninterrupted_run(tmp_path):
    full, trainer = _resumable_run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-6"
    assert (checkpoint / "flop_gates.pt").is_file() and (checkpoint / "model.safetensors").is_file()
    assert not (checkpoint / "adapter_model.safetensors").exists()  # the compacted model, not the adapter

    resumed, again = _resumable_run(tmp_path / "resumed", resume=str(checkpoint))
    assert again.compacted_recovery and again.state.global_step == 12 and again.recovering
    assert again.boundary == pytest.approx(trainer.boundary)
    assert all(torch.equal(m, _masks(full)[k]) for k, m in _masks(resumed).items())
    # the whole gated model, masked-out entries included (set to 0 by the write-back), and its compaction
    for (name, x), y in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)
    for (name, x), y in zip(compact(full).state_dict().items(), compact(resumed).state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)

    masked, _ = _llama()
    with pytest.raises(ValueError, match="holds the compacted model of a compact_recovery run"):
        _trainer(tmp_path / "masked", masked, CountingTask(n=128), compact_recovery=False).train(str(checkpoint))


def test_levels_that_do_not_write_back_fall_back_to_the_masked_route(tmp_path, caplog):
    for levels, optimizers in ((["rank"], False), (["head", "row"], True)):
        model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=levels))
        given = (torch.optim.AdamW(model.parameters(), lr=1e-3), None) if optimizers else (None, None)
        trainer = _trainer(tmp_path, model, CountingTask(n=128), steps=2, optimizers=given)
        with caplog.at_level(logging.INFO, logger="hf_flop.trainer"):
            trainer.train()
        assert not trainer.compacted_recovery and trainer.model is model
        why = "FlopConfig.levels=['rank']" if levels == ["rank"] else "an optimizer was passed"
        assert any("not compacted" in r.message and why in r.message for r in caplog.records), why
        caplog.clear()


def test_bad_compact_recovery(tmp_path):
    with pytest.raises(ValueError, match="compact_recovery"):
        PruningArguments(output_dir=str(tmp_path), compact_recovery="yes")
