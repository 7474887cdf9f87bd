"""hf_flop.calibration: the one home of calibration batches (checks, sampling, eval mode, the input hooks, the split)."""

import pytest
import torch

from hf_flop.calibration import (
    CalibrationSplit,
    InputObserver,
    StopForward,
    check_calibration_data,
    eval_mode,
    iter_calibration,
    observe_inputs,
    reusable_batches,
    sample_batches,
)


def rows(n: int) -> list[dict]:
    return [{"input_ids": [i, i + 1]} for i in range(n)]


def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([row["input_ids"] for row in batch])}


def batches(n: int = 4, length: int = 3) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.full((2, length), i), "attention_mask": torch.ones(2, length)} for i in range(n)]


# --- sampling --------------------------------------------------------------------------------------------
def test_a_map_style_dataset_gives_a_seeded_sample_and_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    sampled = sample_batches(rows(50), 3, 4, 7, collate)
    assert torch.equal(torch.get_rng_state(), before)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(7))[:12].tolist()
    assert [b["input_ids"][:, 0].tolist() for b in sampled] == [order[i : i + 4] for i in range(0, 12, 4)]
    assert [b["input_ids"].tolist() for b in sample_batches(rows(50), 3, 4, 7, collate)] == [
        b["input_ids"].tolist() for b in sampled
    ]


def test_an_iterable_dataset_gives_its_first_rows():
    sampled = sample_batches(iter(rows(10)), 2, 3, 0, collate)
    assert [b["input_ids"][:, 0].tolist() for b in sampled] == [[0, 1, 2], [3, 4, 5]]


def test_too_few_rows_or_bad_counts_are_refused_in_the_callers_words():
    with pytest.raises(ValueError, match="dataset gives 1 calibration batch"):
        sample_batches(rows(3), 4, 4, 0, collate)
    names = {"dataset": "train_dataset", "batch_size": "per_device_train_batch_size", "calibration_data": "batches"}
    with pytest.raises(
        ValueError,
        match="^train_dataset gives 1 .* at least 2 .* pass batches of your own, or use a "
        "smaller per_device_train_batch_size",
    ):
        sample_batches(rows(3), 4, 4, 0, collate, names=names)
    with pytest.raises(ValueError, match="^per_device_train_batch_size=0 must be a positive integer"):
        sample_batches(rows(3), 4, 0, 0, collate, names=names)
    with pytest.raises(ValueError, match="^batches=2.5 must be"):
        sample_batches(rows(3), 2.5, 1, 0, collate)


# --- checks ---------------------------------------------------------------------------------------------
def test_the_whole_is_checked_and_kept_reusable():
    assert check_calibration_data(None) is None
    kept = check_calibration_data(iter(batches()), min_batches=2)
    assert isinstance(kept, list) and len(kept) == 4
    data = batches()
    assert check_calibration_data(data) is data and reusable_batches(data) is data
    with pytest.raises(TypeError, match="^reconstruction_data is a single dict; pass an iterable of batches"):
        check_calibration_data(batches()[0], name="reconstruction_data")
    with pytest.raises(TypeError, match="not iterable"):
        check_calibration_data(5)
    with pytest.raises(ValueError, match=r"has 1 batch\(es\); at least 2 are needed \(most to fit, one held out\)"):
        check_calibration_data(batches(1), min_batches=2, why="most to fit, one held out")


def test_each_batch_is_checked_as_it_is_read():
    assert len(list(iter_calibration(batches(), max_batches=2))) == 2
    with pytest.raises(ValueError, match="^score='fisher' needs a loss, but calibration batch 0 has no 'labels'"):
        list(iter_calibration(batches(), needs_labels="score='fisher'"))
    with pytest.raises(ValueError, match="needs calibration_data"):
        list(iter_calibration(None))
    with pytest.raises(ValueError, match="max_batches=0"):
        list(iter_calibration(batches(), max_batches=0))


# --- running ------------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop, self.first, self.second = torch.nn.Dropout(0.5), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.drop(torch.nn.functional.one_hot(input_ids % 3, 3).float())
        return self.second(self.first(h))


def test_eval_mode_restores_the_mode_even_after_an_error():
    model = Tiny().train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not model.drop.training
        raise RuntimeError
    assert model.training and model.drop.training


def test_the_observer_sees_every_watched_input_with_its_token_mask_and_removes_its_hooks():
    model = Tiny().train()
    seen = []
    observe_inputs(
        model, {"a": model.first, "b": model.second, "a2": model.first}, batches(3), lambda *r: seen.append(r)
    )
    assert [name for name, _, _ in seen] == ["a", "a2", "b"] * 3
    assert all(mask is not None and mask.shape == x.shape[:-1] for _, x, mask in seen)
    assert model.training and not model.first._forward_pre_hooks and not model.second._forward_pre_hooks
    # a mask that does not match the input's tokens is not handed on
    with InputObserver({"a": model.first}, lambda *r: seen.append(r), lambda: torch.ones(5)):
        model(torch.zeros(2, 3, dtype=torch.long))
    assert seen[-1][2] is None and not model.first._forward_pre_hooks


def test_prepended_observers_run_before_the_modules_other_pre_hooks_and_can_stop_the_pass():
    model = Tiny()
    model.first.register_forward_pre_hook(lambda m, args: (args[0] * 0,))  # an input mask, as FlopModel's
    seen = {}

    def record(name, x, mask):
        seen[name] = x.abs().sum().item()
        raise StopForward

    for prepend in (True, False):
        with InputObserver({prepend: model.first}, record, lambda: None, prepend=prepend), pytest.raises(StopForward):
            model(torch.ones(2, 3, dtype=torch.long))
    assert seen[True] > 0 and seen[False] == 0


def test_the_split_holds_out_the_last_batches():
    split = CalibrationSplit(Tiny(), batches(8, length=5), None, 0.25)
    assert split.n_heldout == 2 and [split.heldout(i) for i in range(8)] == [False] * 6 + [True] * 2
    assert split.tokens(heldout=False) == 6 * 10 and split.tokens(heldout=True) == 2 * 10
    assert CalibrationSplit(Tiny(), batches(2), None, 0.9).n_heldout == 1  # one is always left to fit
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        CalibrationSplit(Tiny(), batches(1), None, 0.5)
