"""One-shot reconstruction: refit what the gates keep so each layer computes what it did before pruning.

``reconstruct(model, calibration_data)`` works on any FLOP model whose eval masks are set (after
``prune_oneshot``, ``prune_to_target``, or a ``PruningTrainer`` run). For every gated linear that
lost something it fits, by least squares on calibration tokens (``hf_flop.refit``):

* the consumer of removed heads / FFN rows (attention output, ``o_proj``, ``down_proj``, GPT-2's
  ``c_proj``): its kept columns, and its bias where it has one (or gets one, ``add_bias=True``),
  so its output matches the unpruned layer's output on the same input;
* a rank-pruned layer: the best rank-``r`` map for its actual inputs (activation-aware truncation)
  instead of the plain top singular vectors of the weight.

Order matters: transformer layers are processed first to last, each fed the hidden states the
already-refit layers before it produce, so a layer's refit also sees (and absorbs) what pruning
upstream changed in its input. Inside a layer, modules reading the same tensor (Q/K/V, gate/up) are
refit together, in forward order. Per module only the second moments of its input are kept
(``(d+1) x (d+1)``); what is stored between layers is the hidden state at the transformer-layer
boundary for each calibration batch (one tensor per batch, as every layer-wise method needs).

A held-out part of the calibration batches measures each refit: a module keeps its refit only where
it lowers the held-out output error below plain removal; ``ReconstructionReport`` lists both errors.
The eval masks keep exactly the same units, so ``sparsity_report`` and ``compact`` see the same size,
and compaction of the refit model still reproduces its eval outputs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import UnsupportedArchitectureError, find_layers
from .calibration import CalibrationSplit, InputObserver, StopForward, eval_mode
from .depth import removed_layer_names
from .experts_injection import expert_refit_targets
from .lookup import find_flop_model
from .recognition import spec_for
from .refit import Moments, output_error


@dataclass
class LayerRefit:
    """What reconstruction did to one module. Errors are held-out, relative to the reference output energy."""

    name: str
    kept_inputs: int
    inputs: int
    rank: int | None  # kept rank of a rank-pruned layer
    plain_error: float  # plain removal
    refit_error: float
    applied: bool


@dataclass
class ReconstructionReport:
    """Per module: held-out error of plain removal and of the refit, and which was kept."""

    layers: list[LayerRefit] = field(default_factory=list)
    fit_tokens: int = 0
    heldout_tokens: int = 0
    seconds: float = 0.0
    sequential: bool = True

    def __str__(self) -> str:
        applied = sum(r.applied for r in self.layers)
        lines = [
            f"reconstruction: {applied}/{len(self.layers)} modules refit, {self.fit_tokens:,} fit / "
            f"{self.heldout_tokens:,} held-out tokens, {self.seconds:.1f} s"
            + ("" if self.sequential else " (one pass: unknown architecture, layers not processed in order)"),
            f"{'module':<48} {'inputs':>11} {'rank':>6} {'plain err':>10} {'refit err':>10} {'kept':>8}",
        ]
        for r in self.layers:
            rank = str(r.rank) if r.rank is not None else "-"
            kept = "refit" if r.applied else "plain"
            lines.append(
                f"{r.name[-48:]:<48} {r.kept_inputs:>5}/{r.inputs:<5} {rank:>6} {r.plain_error:>10.4f} "
                f"{r.refit_error:>10.4f} {kept:>8}"
            )
        return "\n".join(lines)


def _input_scales(flop_model) -> dict[str, torch.Tensor]:
    """Per consumer of a head/row group: the eval-mask value of each input feature (0 = removed)."""
    scales = {}
    for group in flop_model.structure_groups:
        mask = flop_model.flop_structure_gates[group.key].deterministic_mask().detach().float()
        scales[group.consumer] = group.feature_mask(mask, group.consumer_unit).cpu()
    return scales


def _targets(flop_model, scales: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The linears that lost something a refit can make up for, in model order: consumers of removed
    heads / FFN rows, and rank-gated layers with closed components; none inside a removed layer (level "layer"),
    whose output no longer reaches the model."""
    found = {}
    removed = removed_layer_names(flop_model)
    for name, layer in flop_model.flop_layers().items():
        if any(name == r or name.startswith(r + ".") for r in removed):
            continue
        lost_inputs = name in scales and bool((scales[name] == 0).any())
        rank_gate = layer.gates().get("rank")
        lost_rank = rank_gate is not None and int(rank_gate.l0(True)) < rank_gate.n
        if lost_inputs or lost_rank:
            found[name] = layer
    return found


class _Recorder:
    """The input moments of some modules (fit and held-out apart), and which tensor each one read."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        calib: CalibrationSplit,
        stop_at: str | None = None,
        keep_inputs: bool = False,
    ) -> None:
        self.keep_inputs, self.stop_at = keep_inputs, stop_at
        self.fit = {n: Moments(m.in_features) for n, m in modules.items()}
        self.held = {n: Moments(m.in_features) for n, m in modules.items()}
        # which tensor each module read in the last batch: address, layout and version (in-place writes
        # bump it); with keep_inputs the tensors are also held, so no freed address can be handed on
        self.inputs: dict[str, tuple] = {}
        self.kept: list[torch.Tensor] = []
        self.calls: list[str] = []
        self.calib = calib
        # prepend: run before FLOP's input masks, so the moments are those of the unmasked input
        self.observer = InputObserver(modules, self._record, lambda: calib.token_mask(calib.current), prepend=True)

    def _record(self, name: str, x: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        (self.held if self.calib.heldout(self.calib.current) else self.fit)[name].add(x, token_mask)
        self.inputs[name] = (x.data_ptr(), tuple(x.shape), x.stride(), x._version)
        if self.keep_inputs:
            self.kept.append(x)
        self.calls.append(name)
        if name == self.stop_at:
            raise StopForward

    def remove(self) -> None:
        self.observer.remove()


def _refit_module(name: str, layer: nn.Module, recorder: _Recorder, scales: dict, options: dict) -> LayerRefit:
    """Fit, compare with plain removal on the held-out moments, apply the refit if it is better."""
    scale = scales.get(name, torch.ones(layer.in_features))
    if not (recorder.fit[name].tokens and recorder.held[name].tokens):  # an expert the batches barely reach
        nan = float("nan")
        return LayerRefit(name, int((scale != 0).sum()), len(scale), None, nan, nan, False)
    fit_m, held_m = recorder.fit[name].matrix(), recorder.held[name].matrix()
    reference, bias = layer.reference()
    plain = layer.folded_weight().to(torch.float64).cpu() * scale.to(torch.float64)[None, :]
    energy = output_error(torch.zeros_like(reference), None, reference.cpu(), _cpu(bias), held_m)
    plain_error = output_error(plain, _cpu(bias), reference.cpu(), _cpu(bias), held_m) / max(energy, 1e-30)
    fit_bias = bias is not None or options["add_bias"]
    fit = layer.refit(fit_m, scale, fit_bias=fit_bias, ridge=options["ridge"])
    if fit is None:
        return LayerRefit(name, int((scale != 0).sum()), len(scale), None, plain_error, plain_error, False)
    refit_error = output_error(fit.weight, fit.bias, reference.cpu(), _cpu(bias), held_m) / max(energy, 1e-30)
    applied = refit_error < plain_error
    if applied:
        layer.apply_fit(fit, scale)
    return LayerRefit(name, int((scale != 0).sum()), len(scale), fit.rank, plain_error, refit_error, applied)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach().cpu() if t is not None else None


def _first_outputs(model: nn.Module, layers: list[nn.Module], calib: CalibrationSplit):
    """One forward per batch recording how every transformer layer is called, and layer 0's hidden states.

    The other arguments (masks, position embeddings) are kept per layer, since a model may give its
    layers different ones (sliding-window layers); their hidden states are not, those come from the
    refit layers before them.
    """
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    first: list[torch.Tensor] = []

    def recorder(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if i == 0:
                first.append(_hidden(args, kwargs))
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[i].append(((None, *args[1:]) if args else (), kwargs))
            if i == len(layers) - 1:
                raise StopForward  # the head is not needed

        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for index, batch in enumerate(calib.batches):
            calib.current = index
            try:
                model(**_without_labels(batch), use_cache=False)
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return calls, first


def _without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _call(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run ``layer`` as the model called it, on other hidden states."""
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


def _run_layer(layer: nn.Module, hidden: list, calls: list, calib: CalibrationSplit, keep_outputs: bool):
    outputs = []
    for index, (h, (args, kwargs)) in enumerate(zip(hidden, calls)):
        calib.current = index
        try:
            out = _call(layer, h, args, kwargs)
        except StopForward:
            out = None
        if keep_outputs:
            outputs.append(out)
    return outputs


def _stages(layer: nn.Module, names: list[str], modules: dict, hidden: list, calls: list, calib: CalibrationSplit):
    """The layer's targets grouped by the tensor they read, in forward order (e.g. [q, k, v], [o], [down])."""
    probe = _Recorder({n: modules[n] for n in names}, calib, keep_inputs=True)
    try:
        _run_layer(layer, hidden[:1], calls[:1], calib, keep_outputs=False)
    finally:
        probe.remove()
    order = list(dict.fromkeys(probe.calls))
    # an expert's tap sees only its routed tokens (possibly none in the probe's batch): the experts of a
    # layer are one stage, each read apart (hf_flop.experts)
    routed = [n for n in names if getattr(modules[n], "refit_stage", False)]
    order = [n for n in order if n not in routed]
    missing = [n for n in names if n not in order and n not in routed]
    if missing:
        raise RuntimeError(f"the calibration forward never reached {missing}; are these modules used by the model?")
    stages: list[list[str]] = []
    for name in order:
        # the probe held every input until here: an equal address is the same tensor, not a freed
        # one's address handed on by the allocator (which grouped o_proj with gate/up now and then)
        if stages and probe.inputs[stages[-1][0]] == probe.inputs[name]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages + ([routed] if routed else [])


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    calibration_data: Iterable,
    *,
    max_batches: int | None = None,
    holdout: float = 0.125,
    ridge: float = 1e-3,
    add_bias: bool = False,
    progress: bool = True,
) -> ReconstructionReport:
    """Refit the pruned layers of a FLOP model to their unpruned outputs (see the module docstring).

    Args:
        calibration_data: an iterable of batches (dicts of tensors with ``input_ids``, e.g. a DataLoader),
            at least two; training text of the task, not the evaluation split.
        max_batches: use at most this many batches.
        holdout: fraction of the batches (at least one) held out to check each refit.
        ridge: relative ridge term (times the mean input second moment) of the least squares.
        add_bias: give bias-less consumers (Llama's ``o_proj``/``down_proj``) a bias that absorbs the
            removed units' mean contribution. The compacted model then needs its plan (no stock config).
        progress: show a progress bar over the transformer layers.

    Returns a ``ReconstructionReport``. The model is changed in place and left in its previous mode.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout={holdout!r} must be in (0, 1), the fraction of batches held out.")
    if ridge < 0:
        raise ValueError(f"ridge={ridge!r} must be >= 0.")
    flop_model = find_flop_model(model)
    started = time.perf_counter()
    calib = CalibrationSplit(model, calibration_data, max_batches, holdout)
    scales = _input_scales(flop_model)
    targets = _targets(flop_model, scales)
    for name, (tap, values) in expert_refit_targets(flop_model).items():  # each expert's down, on its tokens
        targets[name], scales[name] = tap, values
    report = ReconstructionReport(fit_tokens=calib.tokens(False), heldout_tokens=calib.tokens(True))
    widest = max((m.in_features for m in targets.values()), default=0)
    if report.fit_tokens < widest:
        raise ValueError(
            f"calibration data too small: {report.fit_tokens:,} tokens to fit (after holding out "
            f"{calib.n_heldout} batch(es)), fewer than the widest refit layer's {widest:,} inputs, so the least "
            "squares would be underdetermined. Give more or longer calibration sequences (or, in prune_oneshot, "
            "reconstruct=False)."
        )
    options = {"ridge": ridge, "add_bias": add_bias}
    with eval_mode(model):
        try:
            spec = spec_for(flop_model.model, None)
            layer_names = find_layers(flop_model.model, spec)
        except (UnsupportedArchitectureError, AttributeError):
            layer_names = None
        if layer_names is None:
            report.sequential = False
            _one_pass(model, targets, calib, scales, options, report)
        else:
            _layer_by_layer(model, flop_model.model, layer_names, targets, calib, scales, options, report, progress)
    report.seconds = time.perf_counter() - started
    return report


def _one_pass(model, targets: dict, calib: CalibrationSplit, scales: dict, options: dict, report) -> None:
    """Unknown layouts: the moments of every target from one forward pass, then each refit on its own."""
    recorder = _Recorder(targets, calib)
    try:
        for index, batch in enumerate(calib.batches):
            calib.current = index
            model(**_without_labels(batch))
    finally:
        recorder.remove()
    for name, layer in targets.items():
        report.layers.append(_refit_module(name, layer, recorder, scales, options))


def _layer_by_layer(model, task_model, layer_names, targets, calib, scales, options, report, progress) -> None:
    layers = [task_model.get_submodule(name) for name in layer_names]
    calls, hidden = _first_outputs(model, layers, calib)
    bar = _progress(len(layers), progress)
    for i, (prefix, layer) in enumerate(zip(layer_names, layers)):
        names = [n for n in targets if n.startswith(prefix + ".")]
        if names:
            for stage in _stages(layer, names, targets, hidden, calls[i], calib):
                called_last = stage[-1]
                recorder = _Recorder({n: targets[n] for n in stage}, calib, stop_at=called_last)
                try:
                    _run_layer(layer, hidden, calls[i], calib, keep_outputs=False)
                finally:
                    recorder.remove()
                for name in stage:
                    report.layers.append(_refit_module(name, targets[name], recorder, scales, options))
        if i + 1 < len(layers):
            hidden = _run_layer(layer, hidden, calls[i], calib, keep_outputs=True)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # a transformers dependency

    return tqdm(total=total, desc="reconstructing layers", unit="layer")
