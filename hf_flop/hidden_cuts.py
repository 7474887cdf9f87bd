"""What level ``"hidden"`` (``hf_flop.hidden``) removes: the accounting, compaction's cuts, the norm compensation.

* Accounting: a reader's kept input features and a writer's kept output features are the kept
  channels, so a linear keeps ``kept_in * kept_out`` (with head/row gates on its other side) and
  the embeddings, norms and an untargeted head are entries of the channel gate's own
  (``HiddenChannels.count``); a channel's cost is every parameter it removes.
* Compaction: readers lose their input columns, writers their output rows with the gate value folded
  in, and ``cut_stream`` cuts the embeddings (value folded in), the norms and the untargeted heads in
  the state dict; the compacted config states the narrower hidden size and the unchanged head size,
  so a Llama-family model without other differences compacts to its stock class.
* ``compensate_norms``: a norm over fewer channels divides by the RMS of those (the std for
  LayerNorm), which removing channels changes; measured on calibration data, the mean ratio of the
  kept channels' statistic to the full one is folded into each norm's weight, so the norms' outputs
  keep their scale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from torch import nn

from .calibration import eval_mode, iter_calibration, model_device
from .gated import Compacted, Cut
from .gated_norms import NormRescaling
from .hidden import HiddenChannels, hidden_channels
from .lookup import find_flop_model

Narrowing = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _unchanged(name: str, kept_in: torch.Tensor, kept_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return kept_in, kept_out


def narrowing(flop_model, deterministic: bool) -> Narrowing:
    """``(name, kept_in, kept_out) -> (kept_in, kept_out)`` with the kept channels on the stream's side."""
    channels = hidden_channels(flop_model)
    if channels is None:
        return _unchanged
    kept = channels.kept_count(deterministic)
    readers, writers = set(channels.layout.readers), set(channels.layout.writers)

    def narrow(name: str, kept_in: torch.Tensor, kept_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (kept if name in readers else kept_in), (kept if name in writers else kept_out)

    return narrow


def stream_linears(flop_model) -> set[str]:
    """The targeted linears the channel gate shrinks (closing every channel takes them to almost nothing)."""
    channels = hidden_channels(flop_model)
    return set() if channels is None else {*channels.layout.readers, *channels.layout.writers}


class StreamCuts:
    """Compaction's cuts of the residual channels, from the eval mask (``HiddenChannels.kept_channels``)."""

    def __init__(self, channels: HiddenChannels) -> None:
        self.channels = channels
        keep = channels.kept_channels().cpu()
        self.kept = keep.nonzero().squeeze(1)
        self.values = channels.gate.deterministic_mask().detach().float().cpu()[self.kept]

    def narrow_cut(self, name: str, cut: Cut) -> Cut:
        """``cut`` with the kept channels as a reader's columns or a writer's rows."""
        layout = self.channels.layout
        if name in layout.readers:
            return replace(cut, cols=self.kept, scale=cut.scale[self.kept])
        if name in layout.writers:
            return replace(cut, rows=self.kept)
        return cut

    def fold_rows(self, name: str, compacted: Compacted) -> Compacted:
        """A writer's compacted form with the gate values multiplied into its output rows and bias."""
        if name not in self.channels.layout.writers:
            return compacted
        kind, z = compacted.spec["kind"], self.values
        tensors = dict(compacted.tensors)
        keys = {"linear": ("weight", "bias"), "conv1d": ("weight", "bias"), "low_rank": ("out_proj.weight", "out_proj.bias")}
        if kind not in keys:
            raise RuntimeError(f"{name} compacted to a {kind!r} module, whose rows level 'hidden' cannot scale.")
        weight, bias = keys[kind]
        w = tensors[weight]
        tensors[weight] = (w.float() * (z[None, :] if kind == "conv1d" else z[:, None])).to(w.dtype)
        if bias in tensors:
            tensors[bias] = (tensors[bias].float() * z).to(tensors[bias].dtype)
        return Compacted(compacted.spec, tensors, compacted.config)

    @torch.no_grad()
    def cut_stream(self, state: dict[str, torch.Tensor]) -> None:
        """Cut the embeddings (gate values folded in), the norms and the untargeted heads in ``state``."""
        layout, k, z = self.channels.layout, self.kept, self.values
        for name in layout.embeddings:
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = (w.float()[:, k] * z).to(w.dtype).contiguous()
        # a tied head reads the final norm with the embedding's (now z-scaled) weight: undo z in that norm
        divisor = torch.where(z == 0, torch.ones_like(z), z)
        for name in layout.norms:
            for key in [key for key in state if key.rsplit(".", 1)[0] == name]:
                cut = state[key].float()[k]
                if layout.tied is not None and name == layout.final_norm:
                    cut = cut / divisor
                state[key] = cut.to(state[key].dtype).contiguous()
        for name in layout.heads:
            state[f"{name}.weight"] = state[f"{name}.weight"][:, k].contiguous()
        if layout.tied is not None and f"{layout.tied}.weight" in state:
            state[f"{layout.tied}.weight"] = state[f"{layout.embeddings[0]}.weight"]


def stream_cuts(flop_model) -> StreamCuts | None:
    """Compaction's channel cuts, or None without level ``"hidden"``."""
    channels = hidden_channels(flop_model)
    return None if channels is None else StreamCuts(channels)


def removes_channels(flop_model) -> bool:
    """Whether the eval mask removes residual channels (or scales some): ``merge_and_unload`` cannot keep that."""
    channels = hidden_channels(flop_model)
    return channels is not None and not bool((channels.gate.deterministic_mask() == 1).all())


@torch.no_grad()
def compensate_norms(model: nn.Module, calibration_data: Iterable, *, max_batches: int | None = None) -> dict[str, float]:
    """Fold into each residual norm's weight the mean ratio of its kept-channel statistic to its full one.

    Runs the calibration batches through the model with the residual channels all present (other gates
    as set), and per norm measures, token by token, ``RMS(kept channels) / RMS(all)`` (LayerNorm: the
    standard deviations). After pruning the norm divides by the kept channels' statistic; multiplying
    its weight by the mean ratio gives its outputs back their scale. Returns the factors by norm name
    (empty when no channel is removed). The eval masks are untouched, so compaction stays exact.
    """
    flop_model = find_flop_model(model)
    channels = hidden_channels(flop_model)
    if channels is None:
        raise ValueError("compensate_norms needs a model with level 'hidden' (FlopConfig(levels=[..., 'hidden'])).")
    keep = channels.kept_channels()
    if bool(keep.all()):
        return {}
    channels.rescaling = NormRescaling()
    channels._measuring = keep
    try:
        with eval_mode(model):
            for batch in iter_calibration(calibration_data, max_batches=max_batches, device=model_device(model)):
                model(**batch)
    finally:
        channels._measuring = None
    factors = channels.rescaling.factors()
    modules = dict(flop_model.model.named_modules())
    for name, factor in factors.items():
        modules[name].weight.mul_(factor)
    return factors
