"""Calibration data: the batches that one-shot scores, the refit and the trainer's phase boundary read.

One home for what every reader of calibration batches needs:

* the checks: ``check_calibration_data`` (the whole, before it is read) and ``iter_calibration`` (each
  batch as it is read): an iterable of dicts of tensors with a 2-D integer ``input_ids``, and ``labels``
  where a loss is needed. Every bad input gets an error that says what to pass instead;
* ``reusable_batches``: a one-off iterator kept as a list, so that a second reader still has the batches;
* ``sample_batches``: a seeded sample of a dataset, collated into batches;
* ``eval_mode``: a calibration pass runs without dropout and with deterministic masks, and the model
  gets its mode back afterwards;
* ``InputObserver``: forward pre-hooks that hand each watched module's input, with the token mask of
  the batch in flight, to a recorder (the one hook runner of the scores and the reconstruction);
  ``observe_inputs`` runs the calibration batches through it; ``StopForward`` ends a pass early;
* ``CalibrationSplit``: the batches split into the ones a refit fits on and the ones it is checked on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .naming import ParameterNames

# what a calibration batch looks like, for the errors
_BATCHES = "an iterable of batches (each a dict of tensors with 'input_ids')"


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are: the calibration batches go there."""
    return next(model.parameters()).device


# --- checks -------------------------------------------------------------------------------------------


def _check_container(calibration_data: object, name: str) -> None:
    if isinstance(calibration_data, (str, bytes, Mapping, torch.Tensor)):
        raise TypeError(
            f"{name} is a single {type(calibration_data).__name__}; pass {_BATCHES}, e.g. [batch] or a DataLoader."
        )
    if not isinstance(calibration_data, Iterable) and not hasattr(calibration_data, "__getitem__"):
        raise TypeError(
            f"{name} of type {type(calibration_data).__name__} is not iterable; pass a list of batches or a DataLoader."
        )


def _check_batch(index: int, batch: object, needs_labels: str | None) -> Mapping:
    if isinstance(batch, (str, bytes)):
        raise TypeError(
            f"calibration batch {index} is text ({batch[:40]!r}...); tokenize first, e.g. "
            "[tokenizer(texts, return_tensors='pt', padding=True)], and pass the batches of tensors."
        )
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"calibration batch {index} is a {type(batch).__name__}; each batch must be a dict of tensors "
            "with at least 'input_ids' (what a tokenizer with return_tensors='pt' or a DataLoader yields)."
        )
    if "input_ids" not in batch:
        raise ValueError(f"calibration batch {index} has no 'input_ids' (its keys: {sorted(batch)}).")
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"calibration batch {index}['{key}'] is a {type(value).__name__}, not a tensor; tokenize with "
                "return_tensors='pt' and drop text columns (e.g. dataset.remove_columns) before batching."
            )
    ids = batch["input_ids"]
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(
            f"calibration batch {index}['input_ids'] must be a 2-D integer tensor (batch, length), "
            f"got shape {tuple(ids.shape)} dtype {ids.dtype}."
        )
    if needs_labels and "labels" not in batch:
        raise ValueError(
            f"{needs_labels} needs a loss, but calibration batch {index} has no 'labels'. Add them: for causal LMs "
            "labels=input_ids (the model shifts them), for classifiers the class ids."
        )
    return batch


def reusable_batches(calibration_data: Iterable | None) -> Iterable | None:
    """``calibration_data`` as something that can be iterated more than once: a one-off iterator
    (a generator, ``iter(loader)``) becomes a list, anything else (a list, a DataLoader) is kept."""
    if calibration_data is not None and iter(calibration_data) is calibration_data:
        return list(calibration_data)
    return calibration_data


def check_calibration_data(
    calibration_data: Iterable | None, *, name: str = "calibration_data", min_batches: int = 1, why: str = ""
) -> Iterable | None:
    """``calibration_data`` checked as a whole before it is kept for later: None (none given) or an iterable of
    batches, with at least ``min_batches`` where its length is known (``why`` says what needs them). Returns it
    reusable (``reusable_batches``). ``name`` is what the caller calls it, for the errors; each batch is checked
    when it is read (``iter_calibration``)."""
    if calibration_data is None:
        return None
    _check_container(calibration_data, name)
    data = reusable_batches(calibration_data)
    if hasattr(data, "__len__") and len(data) < min_batches:
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} has {len(data)} batch(es); at least {min_batches} are needed{reason}.")
    return data


def iter_calibration(
    calibration_data: Iterable[Mapping[str, torch.Tensor]] | None,
    *,
    needs_labels: str | None = None,
    max_batches: int | None = None,
    device: torch.device | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Validated batches of ``calibration_data`` (an iterable of dicts of tensors, e.g. a DataLoader), on ``device``.

    ``needs_labels`` names what needs a loss (e.g. ``"score='fisher'"``): then every batch must hold ``labels``.
    Every malformed input raises a ``TypeError`` / ``ValueError`` saying what to pass instead.
    """
    if calibration_data is None:
        raise ValueError(
            "this needs calibration_data: an iterable of batches (dicts of tensors with 'input_ids', and 'labels' "
            "where a loss is needed), e.g. a torch DataLoader or [tokenizer(texts, return_tensors='pt')]."
        )
    _check_container(calibration_data, "calibration_data")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} must be a positive integer or None (all batches).")
    count = 0
    for index, batch in enumerate(calibration_data):
        if max_batches is not None and index >= max_batches:
            break
        batch = _check_batch(index, batch, needs_labels)
        count += 1
        yield {key: value.to(device) if device is not None else value for key, value in batch.items()}
    if count == 0:
        raise ValueError("calibration_data yielded no batches; give at least one.")


# --- sampling from a dataset ------------------------------------------------------------------------


def sample_batches(
    dataset,
    batches: int,
    batch_size: int,
    seed: int,
    collate: Callable[[list], Mapping[str, torch.Tensor]],
    *,
    names: Mapping[str, str] | None = None,
) -> list[Mapping[str, torch.Tensor]]:
    """``batches`` collated batches of ``batch_size`` rows of ``dataset``: at least 2 (a refit holds one out).

    A map-style dataset (``len`` and indexing) gives a sample drawn by a generator of its own seeded
    with ``seed``, so the caller's random state (a training run's data order, dropout) is untouched;
    an iterable dataset gives its first rows. ``collate`` turns a list of rows into a batch (a
    data collator; drop the columns the model does not take there). ``names`` maps these parameter
    names (and ``"calibration_data"``, the batches the caller could pass instead) to the caller's, for the errors.
    """
    name = ParameterNames(names)
    for parameter, value in (("batches", batches), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name(parameter)}={value!r} must be a positive integer.")
    count = batches * batch_size
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        generator = torch.Generator().manual_seed(seed)
        rows = [dataset[i] for i in torch.randperm(len(dataset), generator=generator)[:count].tolist()]
    else:  # an iterable dataset: its first rows
        rows = list(itertools.islice(iter(dataset), count))
    sampled = [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    if len(sampled) < 2:
        instead = name.names.get("calibration_data", "calibration batches")
        raise ValueError(
            f"{name('dataset')} gives {len(sampled)} calibration batch(es) of {batch_size} rows; the refit needs at "
            f"least 2 (most to fit, one held out): pass {instead} of your own, or use a smaller {name('batch_size')}."
        )
    return sampled


# --- running the batches ----------------------------------------------------------------------------


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (no dropout, deterministic masks), restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once what it needs is recorded; the runner catches it."""


Record = Callable[[str, torch.Tensor, "torch.Tensor | None"], None]


class InputObserver:
    """Forward pre-hooks handing each watched module's input to ``record(name, x, token_mask)``.

    ``modules`` maps a name (a module's, a gate's) to the module whose input is watched; a module can
    be watched under several names. ``token_mask()`` gives the attention mask of the batch in flight;
    ``record`` gets it where it matches ``x``'s tokens (1 = a real token, 0 = padding), else None.
    ``prepend=True`` runs the hooks before the module's other pre-hooks (FlopModel's input masks on
    the consumers of heads and rows): the input as it arrives. Otherwise they run after them: the
    masked input. A context manager: the hooks are removed on exit (or with ``remove``).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        record: Record,
        token_mask: Callable[[], torch.Tensor | None],
        *,
        prepend: bool = False,
    ) -> None:
        self.record, self.token_mask = record, token_mask
        self.handles = [m.register_forward_pre_hook(self._hook(n), prepend=prepend) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = self.token_mask()
            self.record(name, x, mask if mask is not None and mask.shape == x.shape[:-1] else None)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> InputObserver:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def observe_inputs(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration_data: Iterable,
    record: Record,
    *,
    max_batches: int | None = None,
    prepend: bool = False,
) -> None:
    """Run the calibration batches through ``model`` (eval mode, no gradients) with an ``InputObserver`` on
    ``modules``: ``record(name, x, token_mask)`` sees every watched input of every batch."""
    in_flight: list[torch.Tensor | None] = [None]
    with InputObserver(modules, record, lambda: in_flight[0], prepend=prepend), eval_mode(model), torch.no_grad():
        for batch in iter_calibration(calibration_data, max_batches=max_batches, device=model_device(model)):
            in_flight[0] = batch.get("attention_mask")
            model(**batch)


# --- the fit / held-out split -----------------------------------------------------------------------


class CalibrationSplit:
    """The calibration batches (validated, on the model's device) split into fit and held-out ones.

    A refit fits on the first batches and is checked on the last ``n_heldout`` (a ``holdout``
    fraction, at least one, and at least one batch left to fit). ``current`` is the index of the
    batch in flight, set by whoever runs the forward, so the hooks know which part they observe.
    """

    def __init__(self, model: nn.Module, calibration_data: Iterable, max_batches: int | None, holdout: float):
        device = model_device(model)
        self.batches = list(iter_calibration(calibration_data, max_batches=max_batches, device=device))
        if len(self.batches) < 2:
            raise ValueError(
                f"reconstruction needs at least 2 calibration batches (got {len(self.batches)}): most to fit the "
                "layers, at least one held out to check the fit. Split the data into more, smaller batches."
            )
        self.n_heldout = min(len(self.batches) - 1, max(1, round(holdout * len(self.batches))))
        self.current = 0

    def heldout(self, index: int) -> bool:
        return index >= len(self.batches) - self.n_heldout

    def token_mask(self, index: int) -> torch.Tensor | None:
        """Batch ``index``'s attention mask (1 = a real token), when it has a 2-D one."""
        mask = self.batches[index].get("attention_mask")
        return mask if mask is not None and mask.dim() == 2 else None

    def tokens(self, heldout: bool) -> int:
        """Real tokens in the held-out (or the fit) batches."""
        total = 0
        for i, batch in enumerate(self.batches):
            if self.heldout(i) == heldout:
                mask = self.token_mask(i)
                total += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return total
